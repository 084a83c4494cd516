"""Plotly figures (plain dicts: `{"data": [...], "layout": {...}}`) built from history data.

Plotly renders a few HTML-like tags inside text, so peer-supplied names are HTML-escaped here;
the page embeds the figures with `json_script`, which escapes them for the page itself.
"""

from __future__ import annotations

import html
from typing import Any

STATE_COLORS = {"online": "#2e9d5b", "joining": "#d49b1c", "unreachable": "#d0413f", "offline": "#a0a6b3"}
STATE_LEVELS = {"offline": 0, "unreachable": 1, "joining": 2, "online": 3}
FONT = {"family": "system-ui, -apple-system, Segoe UI, sans-serif", "size": 12}


def _layout(title: str, **extra: Any) -> dict[str, Any]:
    layout = {
        "title": {"text": title, "font": {"size": 14}},
        "font": FONT,
        "margin": {"l": 56, "r": 16, "t": 40, "b": 44},
        "height": 320,
        "paper_bgcolor": "rgba(0,0,0,0)",
        "plot_bgcolor": "#fff",
    }
    layout.update(extra)
    return layout


def _label(peer_id: str, public_name: str | None) -> str:
    short = "…" + peer_id[-6:]
    return html.escape(f"{public_name[:30]} ({short})" if public_name else short)


def coverage_heatmap(history: dict[str, Any]) -> dict[str, Any]:
    coverage = history["coverage"]
    return {
        "data": [
            {
                "type": "heatmap",
                "x": coverage["times"],
                "y": coverage["blocks"],
                "z": coverage["online_servers"],
                "colorscale": [[0, "#f3d3d2"], [0.001, "#d9efe1"], [1, "#1f7a45"]],
                "zmin": 0,
                "colorbar": {"title": {"text": "servers"}},
                "hovertemplate": "%{x}<br>block %{y}: %{z} servers<extra></extra>",
            }
        ],
        "layout": _layout(
            "Block coverage over time (online servers per block)",
            xaxis={"type": "date"},
            yaxis={"title": {"text": "block"}, "autorange": "reversed"},
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
            "Online servers per block (now)",
            xaxis={"title": {"text": "block"}, "dtick": _block_tick(len(current["blocks"]))},
            yaxis={"title": {"text": "servers"}, "rangemode": "tozero"},
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
            "Throughput per block (now, summed over online servers)",
            xaxis={"title": {"text": "block"}, "dtick": _block_tick(len(current["blocks"]))},
            yaxis={"title": {"text": "requests/s"}, "rangemode": "tozero"},
        ),
    }


def availability(history: dict[str, Any]) -> dict[str, Any]:
    data = history["availability"]
    overall = data["overall"]
    title = "Model availability (share of crawls with every block covered)"
    if overall is not None:
        title += f": {overall:.1%}"
    return {
        "data": [
            {
                "type": "scatter",
                "mode": "lines+markers",
                "fill": "tozeroy",
                "x": data["times"],
                "y": [share * 100 for share in data["share"]],
                "customdata": data["snapshots"],
                "line": {"color": STATE_COLORS["online"], "shape": "hv"},
                "marker": {
                    "color": [STATE_COLORS["online"] if s == 1 else STATE_COLORS["unreachable"] for s in data["share"]]
                },
                "hovertemplate": "%{x}<br>%{y:.0f}% of %{customdata} crawls<extra></extra>",
            }
        ],
        "layout": _layout(title, xaxis={"type": "date"}, yaxis={"title": {"text": "%"}, "range": [-2, 102]}),
    }


def peer_throughput(history: dict[str, Any]) -> dict[str, Any]:
    return {
        "data": [
            {
                "type": "scatter",
                "mode": "lines",
                "name": _label(peer["peer_id"], peer["public_name"]),
                "x": peer["times"],
                "y": peer["throughput"],
                "connectgaps": False,
            }
            for peer in history["peers"]
        ],
        "layout": _layout(
            "Throughput of the top servers",
            xaxis={"type": "date"},
            yaxis={"title": {"text": "requests/s"}, "rangemode": "tozero"},
            showlegend=True,
            legend={"orientation": "h", "y": -0.2},
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
    by_model: dict[str, list[dict[str, Any]]] = {}
    for point in points:
        by_model.setdefault(point["dht_prefix"], []).append(point)
    state_traces = [
        {
            "type": "scatter",
            "mode": "markers",
            "name": html.escape(prefix),
            "x": [p["time"] for p in rows],
            "y": [STATE_LEVELS[p["display_state"]] for p in rows],
            "marker": {"color": [STATE_COLORS[p["display_state"]] for p in rows], "size": 7},
            "text": [p["display_state"] for p in rows],
            "hovertemplate": "%{x}: %{text}<extra></extra>",
        }
        for prefix, rows in by_model.items()
    ]
    span_traces = [
        {
            "type": "scatter",
            "mode": "lines",
            "name": html.escape(f"{prefix} {edge}"),
            "x": [p["time"] for p in rows],
            "y": [p[edge] for p in rows],
            "line": {"shape": "hv"},
        }
        for prefix, rows in by_model.items()
        for edge in ("start", "end")
    ]
    return {
        "states": {
            "data": state_traces,
            "layout": _layout(
                "State over time",
                xaxis={"type": "date"},
                yaxis={"tickvals": list(STATE_LEVELS.values()), "ticktext": list(STATE_LEVELS), "range": [-0.5, 3.5]},
                height=260,
                margin={"l": 96, "r": 16, "t": 40, "b": 44},
            ),
        },
        "spans": {
            "data": span_traces,
            "layout": _layout(
                "Span (first and end block)",
                xaxis={"type": "date"},
                yaxis={"title": {"text": "block"}},
                legend={"orientation": "h", "y": -0.25},
            ),
        },
        "throughput": {
            "data": [
                {
                    "type": "scatter",
                    "mode": "lines+markers",
                    "name": html.escape(prefix),
                    "x": [p["time"] for p in rows],
                    "y": [p["throughput"] for p in rows],
                }
                for prefix, rows in by_model.items()
            ],
            "layout": _layout("Announced throughput", xaxis={"type": "date"}, yaxis={"title": {"text": "requests/s"}}),
        },
        "pings": {
            "data": [
                {
                    "type": "scatter",
                    "mode": "lines+markers",
                    "name": "rpc_info round trip",
                    "x": [p["time"] for p in points if p["rpc_latency"] is not None],
                    "y": [p["rpc_latency"] * 1000 for p in points if p["rpc_latency"] is not None],
                }
            ],
            "layout": _layout("Ping from the monitor", xaxis={"type": "date"}, yaxis={"title": {"text": "ms"}}),
        },
    }


def _block_tick(num_blocks: int) -> int:
    return max(1, num_blocks // 16)
