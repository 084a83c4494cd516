"""`/metrics`: the latest snapshot in the Prometheus text format.

Metric names follow health.petals.dev (update_duration, servers_num_total, ping_pct, blocks, rps_avg, ...)
so existing dashboards keep working; crawl_* gauges add the crawl's own health. Samples of one metric
stay together under one TYPE line, and label values (a version string is peer-supplied) are escaped.

Strangers can announce anything, so only servers the monitor verified (display state "online": announced
ONLINE and answered its ping) feed the aggregates: rps, versions, relays, next-server pings. The counts of
servers seen (`servers_num_total`, `servers_num`, `blocks`) list every row, by state.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable

from monitor.reports import STATES, StatusReport

RPS_KINDS = ("network", "inference", "forward")


class Exposition:
    def __init__(self) -> None:
        self._samples: dict[str, list[str]] = defaultdict(list)
        self._help: dict[str, str] = {}

    def add(self, name: str, value: float, labels: dict[str, str] | None = None, help_text: str = "") -> None:
        if help_text:
            self._help.setdefault(name, help_text)
        label_text = ""
        if labels:
            label_text = "{" + ",".join(f'{key}="{escape_label(val)}"' for key, val in labels.items()) + "}"
        self._samples[name].append(f"{name}{label_text} {format_value(value)}")

    def render(self) -> str:
        lines = []
        for name, samples in self._samples.items():
            if name in self._help:
                lines.append(f"# HELP {name} {self._help[name]}")
            lines.append(f"# TYPE {name} gauge")
            lines += samples
        return "\n".join(lines) + "\n"


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def format_value(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def percentile(sorted_values: list[float], pct: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    position = (len(sorted_values) - 1) * pct / 100
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def prometheus_metrics(report: StatusReport) -> str:
    out = Exposition()
    snapshot = report.snapshot
    out.add("update_duration", snapshot.duration, help_text="seconds the last crawl took")
    out.add("crawl_duration_seconds", snapshot.duration, help_text="seconds the last crawl took")
    out.add("crawl_timestamp_seconds", snapshot.created_at.timestamp(), help_text="when the last crawl started")
    out.add("crawl_age_seconds", report.age_seconds, help_text="seconds since the last crawl finished")
    out.add("crawl_stale", int(report.stale), help_text="1 when crawls stopped and the last snapshot is old")
    out.add("crawl_invalid_entries", snapshot.invalid_entries, help_text="malformed block announcements skipped")
    out.add("crawl_invalid_index_entries", snapshot.invalid_index_entries, help_text="malformed model index entries")
    out.add("crawl_skipped_models", snapshot.skipped_models, help_text="indexed models over the caps")
    out.add("crawl_capped_servers", snapshot.capped_servers, help_text="servers over the per-model cap")
    out.add("crawl_unchecked_servers", snapshot.unchecked_servers, help_text="online servers left unpinged")
    out.add("bootstrap_online", sum(p.reachable for p in report.bootstrap), help_text="reachable bootstrap peers")
    return out.render() + report.once("metrics_text", lambda: _snapshot_metrics(report))


def _snapshot_metrics(report: StatusReport) -> str:
    """What depends on the snapshot alone (not on its age): rendered once per snapshot (report.once)."""
    out = Exposition()
    _server_metrics(out, report)
    _model_metrics(out, report)
    return out.render()


def _all_rows(report: StatusReport) -> Iterable[dict]:
    for model in report.models:
        yield from model.rows


def _verified(row: dict) -> bool:
    return row["display_state"] == "online"


def _server_metrics(out: Exposition, report: StatusReport) -> None:
    servers = online = relay = with_pings = 0
    pings: list[float] = []
    infinite = 0
    versions: Counter[str] = Counter()
    for row in _all_rows(report):
        servers += 1
        if not _verified(row):
            continue
        online += 1
        relay += bool(row["using_relay"])
        if row["next_pings"] is not None:
            with_pings += 1
            for rtt in row["next_pings"].values():
                if rtt is None:
                    infinite += 1
                else:
                    pings.append(rtt)
        if row["version"]:
            versions[row["version"]] += 1
    if with_pings and pings:
        out.add("peers_per_srv", (len(pings) + infinite) / with_pings, help_text="next servers each server pings")
        out.add("pings_inf_share", infinite / (len(pings) + infinite), help_text="share of failed next-server pings")
    out.add("servers_num_total", servers, help_text="servers seen across all models, verified or not")
    out.add("servers_num_online", online, help_text="servers online and reached by the monitor's ping")
    out.add("servers_num_relay", relay, help_text="online servers reachable only through a relay")
    if pings:
        pings.sort()
        for pct in (25, 50, 75, 90, 95):
            out.add("ping_pct", percentile(pings, pct), {"pct": str(pct)}, "next-server round trips (s), percentiles")
    for version, count in versions.most_common(100):
        out.add("server_version", count, {"version_number": version}, "online servers per announced version")


def _model_metrics(out: Exposition, report: StatusReport) -> None:
    for model in report.models:
        status = model.status
        labels = {"model": status.dht_prefix}
        per_state = {state: [0] * status.num_blocks for state in STATES}
        total = [0] * status.num_blocks
        rps = {kind: [0.0] * status.num_blocks for kind in RPS_KINDS}
        for row in model.rows:
            verified = _verified(row)
            for block in range(row["start"], min(row["end"], status.num_blocks)):
                total[block] += 1
                per_state[row["display_state"]][block] += 1
                if verified:
                    for kind in RPS_KINDS:
                        rps[kind][block] += row[f"{kind}_rps"] or 0.0
        out.add("model_healthy", int(status.healthy), labels, "1 when every block is served by an online server")
        out.add("n_blocks", status.num_blocks, labels, "blocks in the model")
        out.add("servers_num", len(model.rows), labels, "servers of the model")
        out.add("blocks_total", sum(total), labels, "block replicas announced")
        out.add("blocks_online_min", min(per_state["online"], default=0), labels, "online servers of the worst block")
        for state in STATES:
            out.add("blocks", sum(per_state[state]), {**labels, "state": state}, "block replicas by server state")
        for kind in RPS_KINDS:
            values = rps[kind] or [0.0]
            out.add(
                "rps_avg", sum(values) / len(values), {**labels, "rps": kind}, "requests/s per block of online servers"
            )
            out.add("rps_min", min(values), {**labels, "rps": kind}, "requests/s per block, worst block")
