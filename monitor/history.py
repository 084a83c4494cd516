"""History queries behind the model and peer pages: bounded in size whatever the time range.

A week of crawls once a minute is ~10,000 snapshots, so per-block and per-peer series read an evenly
spaced sample of at most `MAX_POINTS` snapshots; availability reads every snapshot's health flag
(one small row each).
"""

from __future__ import annotations

import datetime as dt
import re
from collections import defaultdict
from typing import Any

from django.utils import timezone
from django.utils.dateparse import parse_datetime

from monitor.models import BlockCoverage, ModelStatus, ServerObservation, ServerState
from monitor.snapshots import server_counts_as_online

RANGES = {"1h": 3600, "24h": 24 * 3600, "7d": 7 * 24 * 3600}
DEFAULT_RANGE = "24h"
MAX_POINTS = 240
AVAILABILITY_BUCKETS = 48
TOP_PEERS = 15
MAX_LISTED = 20  # spans and versions listed on a peer's page
MAX_RANGE = dt.timedelta(days=366)
_DURATION = re.compile(r"^(\d{1,7})([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(value: str | None, now: dt.datetime) -> dt.datetime:
    """`since`: a duration back from now (`90m`, `24h`, `7d`), a unix time, or an ISO 8601 time.
    Raises ValueError for anything else."""
    value = (value or DEFAULT_RANGE).strip()
    if match := _DURATION.match(value):
        seconds = int(match[1]) * _UNITS[match[2]]
        return now - min(dt.timedelta(seconds=seconds), MAX_RANGE)
    if re.fullmatch(r"\d{1,12}(\.\d{1,6})?", value):
        return dt.datetime.fromtimestamp(float(value), tz=dt.UTC)
    parsed = parse_datetime(value) if len(value) <= 40 else None
    if parsed is None:
        raise ValueError("since must be a duration like 1h, 24h or 7d, a unix time, or an ISO 8601 time")
    return parsed if timezone.is_aware(parsed) else timezone.make_aware(parsed, dt.UTC)


def _sample(items: list, limit: int) -> list:
    if len(items) <= limit:
        return items
    step = (len(items) - 1) / (limit - 1)
    return [items[round(i * step)] for i in range(limit)]


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat()


def model_history(dht_prefix: str, since: dt.datetime, until: dt.datetime) -> dict[str, Any]:
    statuses = list(
        ModelStatus.objects.filter(dht_prefix=dht_prefix, created_at__gte=since, created_at__lte=until)
        .order_by("created_at")
        .values_list("id", "created_at", "healthy", "num_blocks")
    )
    sampled = _sample(statuses, MAX_POINTS)
    times = [_iso(created_at) for _, created_at, _, _ in sampled]
    num_blocks = max((n for *_, n in sampled), default=0)
    column = {status_id: i for i, (status_id, *_) in enumerate(sampled)}

    online = [[None] * len(sampled) for _ in range(num_blocks)]
    for model_id, block, count in BlockCoverage.objects.filter(model_id__in=column).values_list(
        "model_id", "block", "online_servers"
    ):
        if block < num_blocks:
            online[block][column[model_id]] = count

    latest_id = statuses[-1][0] if statuses else None
    current = list(
        BlockCoverage.objects.filter(model_id=latest_id).order_by("block").values_list("online_servers", "throughput")
    )
    return {
        "dht_prefix": dht_prefix,
        "since": _iso(since),
        "until": _iso(until),
        "snapshots": len(statuses),
        "coverage": {"times": times, "blocks": list(range(num_blocks)), "online_servers": online},
        "current": {
            "blocks": list(range(len(current))),
            "online_servers": [count for count, _ in current],
            "throughput": [rate for _, rate in current],
        },
        "availability": _availability(statuses, since, until),
        "peers": _peer_series(latest_id, column, times),
    }


def _availability(statuses: list[tuple], since: dt.datetime, until: dt.datetime) -> dict[str, Any]:
    """Share of snapshots in which every block was covered, overall and per time bucket."""
    width = max((until - since) / AVAILABILITY_BUCKETS, dt.timedelta(seconds=1))
    healthy = defaultdict(int)
    total = defaultdict(int)
    for _, created_at, is_healthy, _ in statuses:
        bucket = min(int((created_at - since) / width), AVAILABILITY_BUCKETS - 1)
        total[bucket] += 1
        healthy[bucket] += is_healthy
    buckets = sorted(total)
    overall = sum(healthy.values()) / len(statuses) if statuses else None
    return {
        "times": [_iso(since + width * (b + 0.5)) for b in buckets],
        "share": [healthy[b] / total[b] for b in buckets],
        "snapshots": [total[b] for b in buckets],
        "overall": overall,
    }


def _peer_series(latest_id: int | None, column: dict[int, int], times: list[str]) -> list[dict[str, Any]]:
    """Throughput over time of the peers with the most throughput in the latest snapshot."""
    if latest_id is None:
        return []
    top = list(
        ServerObservation.objects.filter(model_id=latest_id, state=ServerState.ONLINE)
        .order_by("-throughput", "peer_id")
        .values_list("peer_id", "public_name")[:TOP_PEERS]
    )
    series = {peer: {"peer_id": peer, "public_name": name, "throughput": [None] * len(times)} for peer, name in top}
    rows = ServerObservation.objects.filter(model_id__in=column, peer_id__in=series).values_list(
        "model_id", "peer_id", "throughput", "state", "reachable"
    )
    for model_id, peer, throughput, state, reachable in rows:
        if server_counts_as_online(state, reachable):
            series[peer]["throughput"][column[model_id]] = throughput
    return [{**entry, "times": times} for entry in series.values()]


def peer_history(peer_id: str, since: dt.datetime, until: dt.datetime) -> dict[str, Any]:
    rows = list(
        ServerObservation.objects.filter(peer_id=peer_id, created_at__gte=since, created_at__lte=until)
        .order_by("created_at")
        .values(
            "created_at",
            "dht_prefix",
            "start",
            "end",
            "state",
            "reachable",
            "error",
            "rpc_latency",
            "throughput",
            "version",
            "public_name",
            "torch_dtype",
        )
    )
    spans: dict[tuple, dict[str, Any]] = {}
    versions: dict[str, dict[str, Any]] = {}
    for row in rows:
        moment = row["created_at"]
        span = spans.setdefault(
            (row["dht_prefix"], row["start"], row["end"]),
            {"dht_prefix": row["dht_prefix"], "start": row["start"], "end": row["end"], "first_seen": moment},
        )
        span["last_seen"] = moment
        if row["version"]:
            version = versions.setdefault(row["version"], {"version": row["version"], "first_seen": moment})
            version["last_seen"] = moment
    points = _sample(rows, MAX_POINTS * 2)
    for point in points:
        state = ServerState(point["state"]).label
        point["display_state"] = "unreachable" if state == "online" and point["reachable"] is False else state
        point["time"] = _iso(point["created_at"])
    errors = [row for row in rows if row["reachable"] is False][-20:]
    return {
        "peer_id": peer_id,
        "since": _iso(since),
        "until": _iso(until),
        "observations": len(rows),
        "points": points,
        "spans": sorted(spans.values(), key=lambda s: s["last_seen"], reverse=True)[:MAX_LISTED],
        "more_spans": max(len(spans) - MAX_LISTED, 0),
        "versions": sorted(versions.values(), key=lambda v: v["last_seen"], reverse=True)[:MAX_LISTED],
        "errors": list(reversed(errors)),
        "latest": rows[-1] if rows else None,
    }
