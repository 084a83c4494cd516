"""The swarm's state in one snapshot, shaped for the status page, `/api/v1/state` and `/metrics`.

Rows are plain dicts read with one query per table: the page lists thousands of servers and Django
templates resolve dict keys fastest.

Every server is listed, but only those the monitor verified (announced ONLINE and answered its ping:
display state "online") count anywhere: top contributors, what other servers report about their next
servers (`pings_to_me`, reachability issues), and the aggregates of `/metrics`. A server not checked
is "unknown".
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections import Counter, defaultdict
from typing import Any

from django.utils import timezone

from config.formatting import block_range, block_ranges
from monitor import conf
from monitor.models import BlockCoverage, BootstrapObservation, ModelStatus, ServerObservation, ServerState, Snapshot
from monitor.snapshots import display_state

SERVER_FIELDS = (
    "model_id",
    "peer_id",
    "start",
    "end",
    "state",
    "reachable",
    "error",
    "rpc_latency",
    "throughput",
    "inference_rps",
    "forward_rps",
    "network_rps",
    "cache_tokens_left",
    "version",
    "public_name",
    "torch_dtype",
    "quant_type",
    "using_relay",
    "adapters",
    "next_pings",
)
STATE_NAMES = {state.value: state.label for state in ServerState}
STATES = ("online", "joining", "unreachable", "unknown", "offline")
MAX_LISTED_ISSUES = 200


@dataclasses.dataclass
class ModelReport:
    status: ModelStatus
    rows: list[dict[str, Any]]
    state_counts: dict[str, int]
    missing_blocks: str = ""  # e.g. "0:7, 120:126": blocks no online server holds

    @property
    def state(self) -> str:
        return "healthy" if self.status.healthy else "broken"


@dataclasses.dataclass
class StatusReport:
    snapshot: Snapshot
    models: list[ModelReport]
    top_contributors: list[tuple[str, int]]  # (public name, blocks served), most first
    reachability_issues: list[dict[str, Any]]
    bootstrap: list[BootstrapObservation]
    update_period: int
    age_seconds: float = 0.0  # since the crawl finished
    stale: bool = False  # no crawl finished for longer than crawls should take: this is not now

    @property
    def finished_at(self) -> dt.datetime:
        return self.snapshot.created_at + dt.timedelta(seconds=self.snapshot.duration)

    @property
    def age_text(self) -> str:
        """'2 d 3 h', '5 h 12 min', '7 min'."""
        minutes = int(self.age_seconds // 60)
        days, hours, minutes = minutes // 1440, minutes // 60 % 24, minutes % 60
        if days:
            return f"{days} d {hours} h"
        return f"{hours} h {minutes} min" if hours else f"{minutes} min"


def latest_snapshot() -> Snapshot | None:
    return Snapshot.objects.order_by("-created_at", "-pk").first()


def current_report(now: dt.datetime | None = None) -> StatusReport | None:
    """The latest snapshot's report with the configured settings (None before the first crawl)."""
    snapshot = latest_snapshot()
    if snapshot is None:
        return None
    return status_report(
        snapshot,
        update_period=conf.update_period(),
        public_name_min_blocks=conf.public_name_min_blocks(),
        stale_after=conf.gap_seconds(),
        now=now,
    )


def public_url(name: str) -> str | None:
    """A public name that is a web address becomes a link; only http(s), never `javascript:`."""
    return name if name.startswith(("https://", "http://")) and " " not in name else None


def status_report(
    snapshot: Snapshot,
    *,
    update_period: int,
    public_name_min_blocks: int = 10,
    stale_after: float = math.inf,
    now: dt.datetime | None = None,
) -> StatusReport:
    """The snapshot for the pages and APIs; it is `stale` when it finished more than `stale_after` seconds
    before `now` (the crawls stopped, e.g. the site restarted without its workers)."""
    statuses = list(snapshot.models.order_by("position"))
    rows_by_model: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for row in ServerObservation.objects.filter(snapshot=snapshot).values(*SERVER_FIELDS):
        rows_by_model[row["model_id"]].append(row)

    missing: dict[int, list[int]] = defaultdict(list)
    for model_id, block in BlockCoverage.objects.filter(snapshot=snapshot, online_servers=0).values_list(
        "model_id", "block"
    ):
        missing[model_id].append(block)

    contributors: Counter[str] = Counter()
    issues: dict[str, dict[str, Any]] = {}
    models = []
    for status in statuses:
        rows = sorted(rows_by_model.get(status.pk, []), key=lambda r: (r["start"], r["end"], r["peer_id"]))
        counts = dict.fromkeys(STATES, 0)
        # Anti-spam, as health.petals.dev: a name shows for online servers holding a real share of the model.
        min_blocks = min(public_name_min_blocks, math.ceil(status.num_blocks / 2))
        for row in rows:
            _decorate(row, status.num_blocks, min_blocks)
            counts[row["display_state"]] += 1
            if status.official and row["show_public_name"]:
                contributors[row["public_name"]] += row["end"] - row["start"]
        _note_reachability(issues, status, rows)
        models.append(ModelReport(status, rows, counts, block_ranges(missing.get(status.pk, []))))

    bootstrap = list(snapshot.bootstrap.order_by("position"))
    for peer in bootstrap:
        if not peer.reachable:
            issues.setdefault(peer.peer_id, _issue(peer.peer_id, "bootstrap peer", peer.error or "unreachable"))
    finished_at = snapshot.created_at + dt.timedelta(seconds=snapshot.duration)
    age = max(((now or timezone.now()) - finished_at).total_seconds(), 0.0)
    return StatusReport(
        snapshot=snapshot,
        models=models,
        top_contributors=contributors.most_common(),
        reachability_issues=[issues[peer] for peer in sorted(issues)],
        bootstrap=bootstrap,
        update_period=update_period,
        age_seconds=age,
        stale=age > stale_after,
    )


def _issue(peer_id: str, kind: str, err: str) -> dict[str, Any]:
    return {"peer_id": peer_id, "short_peer_id": "…" + peer_id[-6:], "kind": kind, "err": err, "where": []}


def _note_reachability(issues: dict[str, dict[str, Any]], status: ModelStatus, rows: list[dict[str, Any]]) -> None:
    """What the crawl saw of each server's announced addresses: the monitor's own ping failed, or most of
    the verified servers of the model that ping it report they cannot reach it (an unreachable next server
    in their pings). Reports of servers the monitor did not reach are not heard: a stranger's `next_pings`
    must not put a healthy server here."""
    failed_from: Counter[str] = Counter()
    tried_from: Counter[str] = Counter()
    for row in rows:
        if row["display_state"] != "online":
            continue
        for target, rtt in (row["next_pings"] or {}).items():
            tried_from[target] += 1
            failed_from[target] += rtt is None
    for row in rows:
        peer = row["peer_id"]
        where = f"{status.dht_prefix} {block_range(row['start'], row['end'])}"
        failed = failed_from[peer]
        if row["reachable"] is False:
            issue = issues.setdefault(peer, _issue(peer, "server", row["error"] or "unreachable"))
        elif failed and 2 * failed > tried_from[peer] and row["display_state"] == "online":
            err = f"{failed} of {tried_from[peer]} servers that ping it cannot reach it"
            issue = issues.setdefault(peer, _issue(peer, "server", err))
        else:
            continue
        if len(issue["where"]) < 5:
            issue["where"].append(where)


def describe_blocks(blocks: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] → '0:3, 5:6, 7:9' (the site's block notation: end exclusive)."""
    return block_ranges(blocks)


def _decorate(row: dict[str, Any], num_blocks: int, public_name_min_blocks: int) -> None:
    """Add what the page shows: display state, the span bar's geometry, per-block cache, a short id."""
    state = display_state(row["state"], row["reachable"])
    length = row["end"] - row["start"]
    row["display_state"] = state
    row["short_peer_id"] = "…" + row["peer_id"][-6:]
    row["length"] = length
    row["bar_left"] = f"{100 * row['start'] / num_blocks:.3f}%"
    row["bar_width"] = f"{100 * length / num_blocks:.3f}%"
    row["show_public_name"] = bool(row["public_name"]) and state == "online" and length >= public_name_min_blocks
    row["public_url"] = public_url(row["public_name"]) if row["show_public_name"] else None
    # Petals counts cache in tokens of one block's keys or values: a token on a block takes two.
    tokens = row["cache_tokens_left"]
    row["cache_tokens_per_block"] = tokens // (2 * length) if tokens is not None and length > 0 else None
    # Text for the page, formatted here once: template filters cost more per row than Python.
    row["public_name_short"] = _shorten(row["public_name"], 24)
    row["version_short"] = _shorten(row["version"], 12)
    row["throughput_text"] = f"{row['throughput']:.1f}"
    row["precision"] = (row["torch_dtype"] or "") + (
        f" ({row['quant_type']})" if row["quant_type"] and row["quant_type"] != "none" else ""
    )
    row["cache_text"] = "" if row["cache_tokens_per_block"] is None else str(row["cache_tokens_per_block"])
    row["connection"] = {True: "relay", False: "direct", None: ""}[row["using_relay"]]
    latency = row["rpc_latency"]
    row["latency_text"] = "" if latency is None else f"{latency * 1000:.0f} ms"


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ----- the health.petals.dev JSON shape -----


def state_json(report: StatusReport) -> dict[str, Any]:
    snapshot = report.snapshot
    return {
        "bootstrap_states": ["online" if peer.reachable else "unreachable" for peer in report.bootstrap],
        "top_contributors": dict(report.top_contributors),
        "model_reports": [_model_json(model) for model in report.models],
        "reachability_issues": report.reachability_issues[:MAX_LISTED_ISSUES],
        "last_updated": report.finished_at.timestamp(),
        "age_seconds": round(report.age_seconds, 3),
        "stale": report.stale,  # true: the crawls stopped; this is the last thing seen, not now
        "update_period": report.update_period,
        "update_duration": snapshot.duration,
        "invalid_entries": snapshot.invalid_entries,
    }


def _model_json(model: ModelReport) -> dict[str, Any]:
    status = model.status
    pings_to: dict[str, dict[str, float | None]] = defaultdict(dict)
    for row in model.rows:
        if row["display_state"] != "online":
            continue  # what unverified servers say about others is not repeated
        for target, rtt in (row["next_pings"] or {}).items():
            pings_to[target][row["peer_id"]] = rtt
    name = status.name
    return {
        "name": name,
        "short_name": name.split("/")[-1],
        "dht_prefix": status.dht_prefix,
        "repository": status.repository or None,
        "num_blocks": status.num_blocks,
        "official": status.official,
        "limited": False,
        "state": model.state,
        "server_rows": [_server_json(row, pings_to.get(row["peer_id"], {})) for row in model.rows],
    }


def _server_json(row: dict[str, Any], pings_to_me: dict[str, float | None]) -> dict[str, Any]:
    server_info = {
        "state": STATE_NAMES[row["state"]],
        "throughput": row["throughput"],
        "start_block": row["start"],
        "end_block": row["end"],
        "public_name": row["public_name"] or None,
        "version": row["version"] or None,
        "network_rps": row["network_rps"],
        "forward_rps": row["forward_rps"],
        "inference_rps": row["inference_rps"],
        "adapters": row["adapters"],
        "torch_dtype": row["torch_dtype"] or None,
        "quant_type": row["quant_type"] or None,
        "using_relay": row["using_relay"],
        "cache_tokens_left": row["cache_tokens_left"],
        "next_pings": row["next_pings"],
    }
    data = {
        "short_peer_id": "..." + row["peer_id"][-6:],
        "peer_id": row["peer_id"],
        "show_public_name": row["show_public_name"],
        "state": row["display_state"],
        "span": {"peer_id": row["peer_id"], "start": row["start"], "end": row["end"], "server_info": server_info},
        "adapters": [{"name": name, "short_name": name.split("/")[-1]} for name in row["adapters"]],
        "pings_to_me": pings_to_me,
        "rpc_latency": row["rpc_latency"],
    }
    if row["cache_tokens_per_block"] is not None:
        data["cache_tokens_left_per_block"] = row["cache_tokens_per_block"]
    return data
