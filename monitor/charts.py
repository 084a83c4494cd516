"""Plotly figures (plain dicts: `{"data": [...], "layout": {...}}`) built from history data.

Plotly renders a few HTML-like tags inside text, so peer-supplied names are HTML-escaped here;
the page embeds the figures with `json_script`, which escapes them for the page itself.
"""

from __future__ import annotations

import datetime as dt
import html
import math
from typing import Any

STATE_COLORS = {
    "online": "#2e9d5b",
    "unknown": "#8fcfaa",  # announced online, not pinged (monitor.states.display_state)
    "joining": "#d49b1c",
    "unreachable": "#d0413f",
    "offline": "#a0a6b3",
}
STATE_LEVELS = {"offline": 0, "unreachable": 1, "joining": 2, "unknown": 3, "online": 4}
FONT = {"family": "system-ui, -apple-system, Segoe UI, sans-serif", "size": 12}
MIN_TIME_SPAN = dt.timedelta(minutes=10)  # a time axis spans at least this, so ticks never go sub-second
HOVER_TIME = "%{x|%Y-%m-%d %H:%M:%S} UTC"  # the site's time format (config/formatting.py)


def _layout(title: str, **extra: Any) -> dict[str, Any]:
    layout = {
        # Short titles, left-aligned: they fit a phone, and there is no mode bar over them (charts.js).
        "title": {"text": title, "font": {"size": 14}, "x": 0.01, "xanchor": "left", "xref": "container"},
        "font": FONT,
        "margin": {"l": 48, "r": 12, "t": 40, "b": 44},
        "height": 320,
        "autosize": True,
        "paper_bgcolor": "rgba(0,0,0,0)",
        "plot_bgcolor": "#fff",
    }
    layout.update(extra)
    return layout


def _parse(moment: str) -> dt.datetime:
    return dt.datetime.fromisoformat(moment)


def time_axis(*series: list[str]) -> dict[str, Any]:
    """A date axis over the data's own time span (at least MIN_TIME_SPAN, centred on the data), with
    minute ticks (days on long ranges) in UTC: no empty day before a new swarm, no `10:59:30.4765` ticks."""
    moments = [_parse(t) for times in series for t in times if t]
    axis: dict[str, Any] = {"type": "date", "title": {"text": "UTC"}, "nticks": 6}
    if not moments:
        return axis
    start, end = min(moments), max(moments)
    if end - start < MIN_TIME_SPAN:
        pad = (MIN_TIME_SPAN - (end - start)) / 2
        start, end = start - pad, end + pad
    axis["range"] = [_plot_time(start), _plot_time(end)]
    axis["tickformat"] = "%H:%M" if end - start <= dt.timedelta(hours=36) else "%b %d"
    return axis


def _plot_time(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _broken(xs: list[str], ys: list[Any], marks: list[str]) -> tuple[list[str], list[Any]]:
    """The series with a None point at each gap mark (ISO times of one format sort as strings)."""
    if not marks or not xs:
        return xs, ys
    points = sorted([*zip(xs, ys), *((mark, None) for mark in marks)], key=lambda point: point[0])
    return [x for x, _ in points], [y for _, y in points]


def _label(peer_id: str, public_name: str | None) -> str:
    short = "…" + peer_id[-6:]
    return html.escape(f"{public_name[:30]} ({short})" if public_name else short)


def coverage_heatmap(history: dict[str, Any]) -> dict[str, Any]:
    coverage = history["coverage"]
    # Whole servers from 0: a colour bar of 0.6–1.4 servers (plotly's default around one value) reads wrong.
    top = max((n for row in coverage["online_servers"] for n in row if n is not None), default=0)
    zmax = max(int(top), 1)
    return {
        "data": [
            {
                "type": "heatmap",
                "x": coverage["times"],
                "y": coverage["blocks"],
                "z": coverage["online_servers"],
                "colorscale": [[0, "#f3d3d2"], [0.001, "#d9efe1"], [1, "#1f7a45"]],
                "zmin": 0,
                "zmax": zmax,
                "zauto": False,
                "colorbar": {
                    "title": {"text": "servers"},
                    "tickmode": "linear",
                    "tick0": 0,
                    "dtick": max(1, math.ceil(zmax / 5)),
                    "tickformat": "d",
                    "thickness": 12,
                },
                "hoverongaps": False,
                "hovertemplate": HOVER_TIME + "<br>block %{y}: %{z} servers<extra></extra>",
            }
        ],
        "layout": _layout(
            "Online servers per block over time",
            xaxis=time_axis(coverage["times"]),
            yaxis={"title": {"text": "block"}, "autorange": "reversed", "zeroline": False},
        ),
    }


def servers_per_block(history: dict[str, Any]) -> dict[str, Any]:
    current = history["current"]
    colors = [STATE_COLORS["online"] if n else STATE_COLORS["unreachable"] for n in current["online_servers"]]
    return {
        "data": [
            {
                "type": "bar",
                "x": current["blocks"],
                "y": current["online_servers"],
                "marker": {"color": colors},
                "hovertemplate": "block %{x}: %{y} servers<extra></extra>",
            }
        ],
        "layout": _layout(
            "Online servers per block now",
            xaxis={"title": {"text": "block"}, "dtick": _block_tick(len(current["blocks"]))},
            yaxis={
                "title": {"text": "servers"},
                "rangemode": "tozero",
                "tickformat": "d",
                "dtick": _count_tick(current),
            },
        ),
    }


def throughput_per_block(history: dict[str, Any]) -> dict[str, Any]:
    current = history["current"]
    return {
        "data": [
            {
                "type": "bar",
                "x": current["blocks"],
                "y": current["throughput"],
                "marker": {"color": "#3a6df0"},
                "hovertemplate": "block %{x}: %{y:.1f} req/s<extra></extra>",
            }
        ],
        "layout": _layout(
            "Throughput per block now",
            xaxis={"title": {"text": "block"}, "dtick": _block_tick(len(current["blocks"]))},
            yaxis={"title": {"text": "requests/s"}, "rangemode": "tozero"},
        ),
    }


def availability(history: dict[str, Any]) -> dict[str, Any]:
    data = history["availability"]
    overall = data["overall"]
    title = "Availability (every block served)"  # short: a title must fit a phone
    if overall is not None:
        title = f"Availability: {overall:.1%} of observed time"
    # One trace per run of crawls: plotly's fill would bridge a gap (None) inside one trace.
    runs: list[list[tuple[str, float, int]]] = [[]]
    for moment, share, count in zip(data["times"], data["share"], data["snapshots"]):
        if share is None:
            runs.append([])
        else:
            runs[-1].append((moment, share * 100, count))
    traces = [
        {
            "type": "scatter",
            "mode": "lines+markers",
            "fill": "tozeroy",
            "showlegend": False,
            "x": [moment for moment, _, _ in run],
            "y": [share for _, share, _ in run],
            "customdata": [count for _, _, count in run],
            "line": {"color": STATE_COLORS["online"], "shape": "hv"},
            "marker": {"color": [STATE_COLORS["online" if y >= 100 else "unreachable"] for _, y, _ in run]},
            "hovertemplate": HOVER_TIME + "<br>%{y:.0f}% of %{customdata} crawls<extra></extra>",
        }
        for run in runs
        if run
    ]
    return {
        "data": traces,
        "layout": _layout(title, xaxis=time_axis(data["times"]), yaxis={"title": {"text": "%"}, "range": [-2, 102]}),
    }


def peer_throughput(history: dict[str, Any]) -> dict[str, Any]:
    return {
        "data": [
            {
                "type": "scatter",
                "mode": "lines+markers",  # a peer seen once is a dot, not nothing
                "name": _label(peer["peer_id"], peer["public_name"]),
                "x": peer["times"],
                "y": peer["throughput"],
                "connectgaps": False,
                "marker": {"size": 5},
                "hovertemplate": HOVER_TIME + "<br>%{y:.1f} req/s<extra>%{fullData.name}</extra>",
            }
            for peer in history["peers"]
        ],
        "layout": _layout(
            "Throughput of the top servers",
            xaxis=time_axis(*(peer["times"] for peer in history["peers"])),
            yaxis={"title": {"text": "requests/s"}, "rangemode": "tozero"},
            showlegend=True,
            legend={"orientation": "h", "y": -0.25},
            height=380,
        ),
    }


def model_figures(history: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        "coverage": coverage_heatmap(history),
        "servers": servers_per_block(history),
        "throughput": throughput_per_block(history),
        "availability": availability(history),
        "peers": peer_throughput(history),
    }


def peer_figures(history: dict[str, Any]) -> dict[str, dict[str, Any]]:
    points = history["points"]
    marks = history.get("gap_marks", [])
    by_model: dict[str, list[dict[str, Any]]] = {}
    for point in points:
        by_model.setdefault(point["dht_prefix"], []).append(point)
    xaxis = time_axis([p["time"] for p in points])

    def line(name: str, rows: list[dict[str, Any]], values: list[Any], **extra: Any) -> dict[str, Any]:
        xs, ys = _broken([p["time"] for p in rows], values, marks)
        return {"type": "scatter", "name": html.escape(name), "x": xs, "y": ys, "connectgaps": False, **extra}

    state_traces = [
        {
            "type": "scatter",
            "mode": "markers",
            "name": html.escape(prefix),
            "x": [p["time"] for p in rows],
            "y": [STATE_LEVELS[p["display_state"]] for p in rows],
            "marker": {"color": [STATE_COLORS[p["display_state"]] for p in rows], "size": 7},
            "text": [p["display_state"] for p in rows],
            "hovertemplate": HOVER_TIME + ": %{text}<extra></extra>",
        }
        for prefix, rows in by_model.items()
    ]
    span_traces = [
        line(
            f"{prefix} {edge}",
            rows,
            [p[edge] for p in rows],
            mode="lines+markers",
            line={"shape": "hv"},
            marker={"size": 4},
            hovertemplate=HOVER_TIME + f"<br>{edge} %{{y}}<extra></extra>",
        )
        for prefix, rows in by_model.items()
        for edge in ("start", "end")
    ]
    pinged = [p for p in points if p["rpc_latency"] is not None]
    return {
        "states": {
            "data": state_traces,
            "layout": _layout(
                "State over time",
                xaxis=xaxis,
                yaxis={"tickvals": list(STATE_LEVELS.values()), "ticktext": list(STATE_LEVELS), "range": [-0.5, 4.5]},
                height=260,
                margin={"l": 84, "r": 12, "t": 40, "b": 44},
                showlegend=False,
            ),
        },
        "spans": {
            "data": span_traces,
            "layout": _layout(
                "Span (first block, end block)",
                xaxis=xaxis,
                yaxis={"title": {"text": "block"}, "rangemode": "tozero"},
                legend={"orientation": "h", "y": -0.3},
            ),
        },
        "throughput": {
            "data": [
                line(
                    prefix,
                    rows,
                    [p["throughput"] for p in rows],
                    mode="lines+markers",
                    hovertemplate=HOVER_TIME + "<br>%{y:.1f} req/s<extra></extra>",
                )
                for prefix, rows in by_model.items()
            ],
            "layout": _layout(
                "Announced throughput",
                xaxis=xaxis,
                yaxis={"title": {"text": "requests/s"}, "rangemode": "tozero"},
                legend={"orientation": "h", "y": -0.3},
            ),
        },
        "pings": {
            "data": [
                line(
                    "rpc_info round trip",
                    pinged,
                    [p["rpc_latency"] * 1000 for p in pinged],
                    mode="lines+markers",
                    hovertemplate=HOVER_TIME + "<br>%{y:.0f} ms<extra></extra>",
                )
            ],
            "layout": _layout(
                "Ping from the monitor",
                xaxis=xaxis,
                yaxis={"title": {"text": "ms"}, "rangemode": "tozero"},
                showlegend=False,
            ),
        },
    }


def _block_tick(num_blocks: int) -> int:
    return max(1, num_blocks // 16)


def _count_tick(current: dict[str, Any]) -> int:
    """Whole servers on the axis: steps of 1 up to about five."""
    return max(1, math.ceil(max(current["online_servers"], default=0) / 5))
