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

from monitor import conf
from monitor.models import ModelStatus, ServerObservation, ServerState
from monitor.states import display_state, server_counts_as_online

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


def model_history(
    dht_prefix: str, since: dt.datetime, until: dt.datetime, *, period: float | None = None, gap: float | None = None
) -> dict[str, Any]:
    """Chart data of one model. Crawls further apart than `gap` seconds (default: MONITOR_GAP_PERIODS update
    periods) leave a gap: nothing ran then, so the series break there and availability leaves it out."""
    period = float(conf.update_period() if period is None else period)
    gap = conf.gap_seconds() if gap is None else gap
    statuses = list(
        ModelStatus.objects.filter(dht_prefix=dht_prefix, created_at__gte=since, created_at__lte=until)
        .order_by("created_at")
        .values_list("id", "created_at", "healthy", "num_blocks")
    )
    sampled = _sample(statuses, MAX_POINTS)
    gaps = find_gaps([created_at for _, created_at, _, _ in statuses], gap)
    # Columns of the time series: the sampled snapshots, and blank columns (None) where gaps are.
    timeline = sorted(
        [(created_at, i) for i, (_, created_at, _, _) in enumerate(sampled)]
        + [(moment, None) for moment in gap_marks(gaps, period)],
        key=lambda item: item[0],
    )
    times = [_iso(moment) for moment, _ in timeline]
    positions = [i for _, i in timeline]
    num_blocks = max((n for *_, n in sampled), default=0)
    column = {status_id: i for i, (status_id, *_) in enumerate(sampled)}

    online_sampled = [[None] * len(sampled) for _ in range(num_blocks)]
    # One small array per sampled snapshot (the coverage of every block of the model).
    for model_id, counts in ModelStatus.objects.filter(id__in=column).order_by().values_list("id", "coverage"):
        for block, count in enumerate((counts or [])[:num_blocks]):
            online_sampled[block][column[model_id]] = count
    online = [_spread(row, positions) for row in online_sampled]

    latest_id = statuses[-1][0] if statuses else None
    latest = ModelStatus.objects.filter(id=latest_id).values_list("coverage", "coverage_throughput").first()
    counts, rates = latest or ([], [])
    current = list(zip(counts or [], rates or []))
    return {
        "dht_prefix": dht_prefix,
        "since": _iso(since),
        "until": _iso(until),
        "snapshots": len(statuses),
        "gaps": [{"from": _iso(a), "to": _iso(b)} for a, b in gaps],
        "coverage": {"times": times, "blocks": list(range(num_blocks)), "online_servers": online},
        "current": {
            "blocks": list(range(len(current))),
            "online_servers": [count for count, _ in current],
            "throughput": [rate for _, rate in current],
        },
        "availability": _availability(statuses, since, until, period, gap),
        "peers": _peer_series(latest_id, column, times, positions),
    }


def find_gaps(moments: list[dt.datetime], gap: float) -> list[tuple[dt.datetime, dt.datetime]]:
    """(last crawl before, first crawl after) of each stretch longer than `gap` seconds without a crawl."""
    return [(a, b) for a, b in zip(moments, moments[1:]) if (b - a).total_seconds() > gap]


def gap_marks(gaps: list[tuple[dt.datetime, dt.datetime]], period: float) -> list[dt.datetime]:
    """Where blank points go: one period after the last crawl and one before the next, so that a heatmap's
    cells and a line's segments stop about where the crawls stopped."""
    step = dt.timedelta(seconds=period)
    marks = []
    for a, b in gaps:
        marks += [a + step, b - step] if b - step > a + step else [a + (b - a) / 2]
    return marks


def _spread(values: list, positions: list[int | None]) -> list:
    return [None if i is None else values[i] for i in positions]


def _availability(
    statuses: list[tuple], since: dt.datetime, until: dt.datetime, period: float, gap: float
) -> dict[str, Any]:
    """Share of the observed time in which every block was covered, overall and per time bucket.

    A crawl stands for the time until the next one, or for one update period when the next comes after
    a gap (or has not come yet): time when nothing ran is not counted either way. Each bucket's point
    sits at its first crawl, the series breaks (None) at gaps, and each run of crawls ends with a point
    at its end, so a step line covers exactly the observed time."""
    width = max((until - since) / AVAILABILITY_BUCKETS, dt.timedelta(seconds=1))
    # Keyed by (run of crawls without a gap, time bucket): chronological, and a gap never hides in a bucket.
    healthy: dict[tuple[int, int], float] = defaultdict(float)
    observed: dict[tuple[int, int], float] = defaultdict(float)
    count: dict[tuple[int, int], int] = defaultdict(int)
    first: dict[tuple[int, int], dt.datetime] = {}
    run_ends: dict[tuple[int, int], dt.datetime] = {}  # the key of a run's last crawl → the run's end
    run = 0
    for index, (_, created_at, is_healthy, _) in enumerate(statuses):
        following = statuses[index + 1][1] if index + 1 < len(statuses) else None
        continues = following is not None and (following - created_at).total_seconds() <= gap
        seconds = (following - created_at).total_seconds() if continues else period
        key = (run, min(max(int((created_at - since) / width), 0), AVAILABILITY_BUCKETS - 1))
        observed[key] += seconds
        healthy[key] += seconds if is_healthy else 0.0
        count[key] += 1
        first.setdefault(key, created_at)
        if not continues:
            run_ends[key] = created_at + dt.timedelta(seconds=seconds)
            run += 1
    times: list[str] = []
    share: list[float | None] = []
    snapshots: list[int | None] = []
    for key in sorted(observed):
        value = healthy[key] / observed[key] if observed[key] else 0.0
        times.append(_iso(first[key]))
        share.append(value)
        snapshots.append(count[key])
        if key in run_ends:
            times += [_iso(run_ends[key]), _iso(run_ends[key])]
            share += [value, None]  # the run's end, then a break
            snapshots += [count[key], None]
    if share and share[-1] is None:  # nothing to break from after the last run
        del times[-1], share[-1], snapshots[-1]
    total = sum(observed.values())
    return {
        "times": times,
        "share": share,
        "snapshots": snapshots,
        "observed_seconds": total,
        "overall": sum(healthy.values()) / total if total else None,
    }


def _peer_series(
    latest_id: int | None, column: dict[int, int], times: list[str], positions: list[int | None]
) -> list[dict[str, Any]]:
    """Throughput over time of the peers with the most throughput in the latest snapshot."""
    if latest_id is None:
        return []
    top = list(
        ServerObservation.objects.filter(model_id=latest_id, state=ServerState.ONLINE)
        .order_by("-throughput", "peer_id")
        .values_list("peer_id", "public_name")[:TOP_PEERS]
    )
    series = {peer: {"peer_id": peer, "public_name": name, "throughput": [None] * len(column)} for peer, name in top}
    rows = ServerObservation.objects.filter(model_id__in=column, peer_id__in=series).values_list(
        "model_id", "peer_id", "throughput", "state", "reachable"
    )
    for model_id, peer, throughput, state, reachable in rows:
        if server_counts_as_online(state, reachable):
            series[peer]["throughput"][column[model_id]] = throughput
    return [
        {**entry, "throughput": _spread(entry["throughput"], positions), "times": times} for entry in series.values()
    ]


def peer_history(
    peer_id: str, since: dt.datetime, until: dt.datetime, *, period: float | None = None, gap: float | None = None
) -> dict[str, Any]:
    """A peer's observations; `gap_marks` are where its lines break (no crawl saw it for `gap` seconds)."""
    period = float(conf.update_period() if period is None else period)
    gap = conf.gap_seconds() if gap is None else gap
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
        point["display_state"] = display_state(point["state"], point["reachable"])
        point["time"] = _iso(point["created_at"])
    errors = [row for row in rows if row["reachable"] is False][-20:]
    return {
        "peer_id": peer_id,
        "since": _iso(since),
        "until": _iso(until),
        "observations": len(rows),
        "points": points,
        "gap_marks": [
            _iso(mark) for mark in gap_marks(find_gaps(sorted({r["created_at"] for r in rows}), gap), period)
        ],
        "spans": sorted(spans.values(), key=lambda s: s["last_seen"], reverse=True)[:MAX_LISTED],
        "more_spans": max(len(spans) - MAX_LISTED, 0),
        "versions": sorted(versions.values(), key=lambda v: v["last_seen"], reverse=True)[:MAX_LISTED],
        "errors": list(reversed(errors)),
        "latest": rows[-1] if rows else None,
    }
