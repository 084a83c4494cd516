"""The swarm's state in one snapshot, shaped for the status page, `/api/v1/state` and `/metrics`.

Rows are plain dicts read with one query per table: a report holds thousands of servers and Django
templates resolve dict keys fastest.

The report of the latest snapshot is built once per process and snapshot (`current_report`): every
request only asks the database for the latest snapshot's id, and computes how old it is.

Every server is in the report (the JSON API lists them all; the status page at most
MONITOR_PAGE_SERVERS_PER_MODEL per model, verified ones first), but only those the monitor verified
(announced ONLINE and answered its ping: display state "online") count anywhere: top contributors, what
other servers report about their next servers (`pings_to_me`, reachability issues), and the aggregates of
`/metrics`. A server not checked is "unknown".
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import threading
from collections import Counter, defaultdict
from typing import Any

from django.utils import timezone

from config.formatting import block_range, block_ranges, shorten
from monitor import conf
from monitor.models import BootstrapObservation, ModelStatus, ServerObservation, ServerState, Snapshot
from monitor.states import display_state

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
# The status page lists servers in this order: verified first, then those it may list once checked.
PAGE_ORDER = {state: rank for rank, state in enumerate(("online", "unknown", "unreachable", "joining", "offline"))}
MAX_LISTED_ISSUES = 200


@dataclasses.dataclass
class ModelReport:
    status: ModelStatus
    rows: list[dict[str, Any]]
    state_counts: dict[str, int]
    missing_blocks: str = ""  # e.g. "0:7, 120:126": blocks no online server holds
    listed_rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # what the status page lists
    unlisted: int = 0  # servers the status page leaves to the model page and the API

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
    # What the APIs derive from the snapshot, computed once: the per-request copies share this dict.
    derived: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def once(self, name: str, compute: Any) -> Any:
        """`compute()`'s value, computed at most once per snapshot and process (the result is shared: never
        change it)."""
        if name not in self.derived:
            self.derived[name] = compute()
        return self.derived[name]

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


def latest_snapshot_key() -> tuple[int, dt.datetime] | None:
    """(id, start time) of the latest snapshot: what names its report (an id alone may come back after a
    rollback, e.g. between tests)."""
    return Snapshot.objects.order_by("-created_at", "-pk").values_list("pk", "created_at").first()


def snapshot_age(snapshot: Snapshot, now: dt.datetime | None = None) -> tuple[float, bool]:
    """(seconds since the crawl finished, stale): the one staleness rule of every page and API. A snapshot
    is stale once no crawl finished for longer than crawls may be apart (conf.gap_seconds)."""
    finished_at = snapshot.created_at + dt.timedelta(seconds=snapshot.duration)
    age = max(((now or timezone.now()) - finished_at).total_seconds(), 0.0)
    return age, age > conf.gap_seconds()


class ReportCache:
    """The latest reports of this process, by snapshot id and the settings they were built with.

    Each process builds a snapshot's report once; a request asks for the latest id first, so a newer
    snapshot is never answered with an older report. One build at a time: requests arriving together
    after a crawl wait for the first one's report instead of each building their own."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._reports: dict[tuple, StatusReport] = {}
        self._lock = threading.Lock()  # guards _reports
        self._building = threading.Lock()  # one build at a time
        self.builds = 0

    def get(self, key: tuple, build: Any) -> StatusReport | None:
        with self._lock:
            report = self._reports.get(key)
        if report is not None:
            return report
        with self._building:
            with self._lock:
                report = self._reports.get(key)
            if report is None:
                report = build()
                if report is None:
                    return None
                self.builds += 1
                with self._lock:
                    self._reports[key] = report
                    while len(self._reports) > self.size:
                        del self._reports[next(iter(self._reports))]  # the oldest entry
        return report

    def clear(self) -> None:
        with self._lock:
            self._reports.clear()


REPORTS = ReportCache()


def current_report(now: dt.datetime | None = None) -> StatusReport | None:
    """The latest snapshot's report with the configured settings (None before the first crawl): built once
    per snapshot in this process; its age and staleness are of this request."""
    latest = latest_snapshot_key()
    if latest is None:
        return None
    snapshot_id = latest[0]
    settings = (conf.update_period(), conf.public_name_min_blocks(), conf.page_servers_per_model())

    def build() -> StatusReport | None:
        snapshot = Snapshot.objects.filter(pk=snapshot_id).first()  # None: pruned in between
        if snapshot is None:
            return None
        return status_report(
            snapshot, update_period=settings[0], public_name_min_blocks=settings[1], listed_per_model=settings[2]
        )

    report = REPORTS.get((*latest, *settings), build)
    if report is None:
        return None
    age, stale = snapshot_age(report.snapshot, now)
    return dataclasses.replace(report, age_seconds=age, stale=stale)  # shares the cached rows, never changes them


def public_url(name: str) -> str | None:
    """A public name that is a web address becomes a link; only http(s), never `javascript:`."""
    return name if name.startswith(("https://", "http://")) and " " not in name else None


def status_report(
    snapshot: Snapshot,
    *,
    update_period: int,
    public_name_min_blocks: int = 10,
    listed_per_model: int | None = None,
    now: dt.datetime | None = None,
) -> StatusReport:
    """The snapshot for the pages and APIs; it is `stale` (snapshot_age) when no crawl finished for longer
    than crawls may be apart (the crawls stopped, e.g. the site restarted without its workers). The status
    page lists `listed_per_model` servers of each model (all when None)."""
    statuses = list(snapshot.models.order_by("position"))
    rows_by_model: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for row in ServerObservation.objects.filter(snapshot=snapshot).values(*SERVER_FIELDS):
        rows_by_model[row["model_id"]].append(row)

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
        listed = _page_rows(rows, listed_per_model)
        missing = block_ranges(status.missing_blocks())  # from the model's coverage array
        models.append(ModelReport(status, rows, counts, missing, listed, unlisted=len(rows) - len(listed)))

    bootstrap = list(snapshot.bootstrap.order_by("position"))
    for peer in bootstrap:
        if not peer.reachable:
            issues.setdefault(peer.peer_id, _issue(peer.peer_id, "bootstrap peer", peer.error or "unreachable"))
    age, stale = snapshot_age(snapshot, now)
    return StatusReport(
        snapshot=snapshot,
        models=models,
        top_contributors=contributors.most_common(),
        reachability_issues=[issues[peer] for peer in sorted(issues)],
        bootstrap=bootstrap,
        update_period=update_period,
        age_seconds=age,
        stale=stale,
    )


def _page_rows(rows: list[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    """The rows the status page lists: verified servers first (then by blocks), at most `limit`."""
    ranked = sorted(rows, key=lambda row: PAGE_ORDER[row["display_state"]])  # stable: blocks order within a state
    return ranked if limit is None else ranked[: max(limit, 0)]


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
    row["public_name_short"] = shorten(row["public_name"], 24)
    row["version_short"] = shorten(row["version"], 12)
    row["throughput_text"] = f"{row['throughput']:.1f}"
    row["precision"] = (row["torch_dtype"] or "") + (
        f" ({row['quant_type']})" if row["quant_type"] and row["quant_type"] != "none" else ""
    )
    row["cache_text"] = "" if row["cache_tokens_per_block"] is None else str(row["cache_tokens_per_block"])
    row["connection"] = {True: "relay", False: "direct", None: ""}[row["using_relay"]]
    latency = row["rpc_latency"]
    row["latency_text"] = "" if latency is None else f"{latency * 1000:.0f} ms"


# ----- the health.petals.dev JSON shape -----


def state_json(report: StatusReport) -> dict[str, Any]:
    snapshot = report.snapshot
    return {
        "bootstrap_states": ["online" if peer.reachable else "unreachable" for peer in report.bootstrap],
        "top_contributors": dict(report.top_contributors),
        "model_reports": report.once("model_json", lambda: [_model_json(model) for model in report.models]),
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
