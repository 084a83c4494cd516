"""`{% server_rows rows %}`: the status page's server table body.

A swarm can have thousands of servers; rendered through template variables the table alone took
~150 ms for 2000 rows (each variable goes through lazy-string checks and localization). Here each
row is one format string, and every value is HTML-escaped with `html.escape` (quotes included),
exactly as autoescaping would.
"""

from __future__ import annotations

from html import escape
from typing import Any

from django import template
from django.urls import reverse
from django.utils.safestring import SafeString, mark_safe

from config.formatting import shorten

register = template.Library()

PEER_PLACEHOLDER = "PEER"

ROW = (
    '<tr class="server {state}" data-peer-id="{peer_id}">'
    '<td class="toggle"><button type="button" class="expand" aria-expanded="false" title="details">'
    '<span aria-hidden="true">▸</span><span class="sr-only">details</span></button></td>'
    # data-label: the column's name, shown before the value where a phone lays the row out without a header
    '<td data-label="Server"><a href="{url}" title="{peer_id}">{short_peer_id}</a></td>'
    '<td data-label="Contributor">{contributor}</td>'
    '<td data-label="Version">{version}</td>'
    '<td class="num" data-label="Throughput, req/s">{throughput}</td>'
    '<td data-label="Precision">{precision}</td>'
    '<td class="adapters" data-label="Adapters">{adapters}</td>'
    '<td class="num" data-label="Cache/block">{cache}</td>'
    '<td data-label="Connection">{connection}</td>'
    '<td class="num" data-label="Ping">{latency}</td>'
    '<td data-label="Span">{start}:{end}</td>'
    '<td class="blocks"><div class="track"><span class="bar {state}" style="left:{left};width:{width}" '
    'title="{state}: blocks {start}:{end}"></span></div></td>'
    "</tr>\n"
    # Shown by the row's button (status.js); colspan over-spans on purpose, whatever columns the table has.
    '<tr class="server-detail" hidden><td colspan="99">{detail}</td></tr>\n'
)
MAX_NEXT_PINGS = 12


def _contributor(row: dict[str, Any]) -> str:
    if not row["show_public_name"]:
        return ""
    name, short = escape(row["public_name"]), escape(row["public_name_short"])
    if row["public_url"]:
        return (
            f'<a href="{escape(row["public_url"])}" rel="nofollow noopener" target="_blank" title="{name}">{short}</a>'
        )
    return f'<span title="{name}">{short}</span>'


def _adapters(names: list[str], shown: int = 4) -> str:
    """Each adapter by the last part of its name (the whole name on hover), the first few of them."""
    items = [
        f'<span title="{escape(name)}">{escape(shorten(name.rsplit("/", 1)[-1], 20))}</span>' for name in names[:shown]
    ]
    if len(names) > shown:
        items.append(f'<span class="muted">+{len(names) - shown}</span>')
    return ", ".join(items)


def _next_pings(pings: dict[str, float | None] | None, peer_url: str) -> str:
    """The servers this one pings as candidates for the next hop, and their round trips."""
    if not pings:
        return '<span class="muted">none reported</span>'
    ranked = sorted(pings.items(), key=lambda item: (item[1] is None, item[1] or 0.0, item[0]))
    items = []
    for peer, rtt in ranked[:MAX_NEXT_PINGS]:
        rtt_text = "unreachable" if rtt is None else f"{rtt * 1000:.0f} ms"
        link = escape(peer_url.replace(PEER_PLACEHOLDER, peer))
        items.append(f'<a href="{link}" title="{escape(peer)}">…{escape(peer[-6:])}</a> {rtt_text}')
    if len(ranked) > MAX_NEXT_PINGS:
        items.append(f'<span class="muted">+{len(ranked) - MAX_NEXT_PINGS}</span>')
    return ", ".join(items)


def _rate(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _detail(row: dict[str, Any], peer_url: str) -> str:
    """Everything the server announced and the crawl measured, as a definition list (all values escaped)."""
    tokens = row["cache_tokens_left"]
    cache = ""
    if tokens is not None:
        cache = f"{tokens:,} tokens" + (f" ({row['cache_text']} per block)" if row["cache_text"] else "")
    rates = ", ".join(
        f"{kind} {_rate(row[f'{kind}_rps'])}" for kind in ("inference", "forward", "network") if row[f"{kind}_rps"]
    )
    ping = row["latency_text"] or ("not pinged" if row["reachable"] is None else "")
    if row["reachable"] is False:
        ping = f"failed: {row['error'] or 'unreachable'}"
    fields = [
        ("Peer id", f"<code>{escape(row['peer_id'])}</code>"),
        ("Name", escape(row["public_name"]) if row["show_public_name"] else ""),
        ("Version", escape(row["version"])),
        (
            "Throughput",
            f"{escape(row['throughput_text'])} requests/s" + (f" ({escape(rates)} requests/s)" if rates else ""),
        ),
        ("Precision", escape(row["torch_dtype"] or "")),
        ("Quantization", escape(row["quant_type"] or "")),
        ("Cache left", escape(cache)),
        ("Adapters", ", ".join(escape(name) for name in row["adapters"] or []) or '<span class="muted">none</span>'),
        ("Connection", escape(row["connection"])),
        ("Monitor's ping", escape(ping)),
        ("Pings to next servers", _next_pings(row["next_pings"], peer_url)),
    ]
    items = "".join(f"<div><dt>{name}</dt><dd>{value}</dd></div>" for name, value in fields if value)
    return f'<dl class="server-info">{items}</dl>'


@register.simple_tag
def server_rows(rows: list[dict[str, Any]]) -> SafeString:
    peer_url = reverse("monitor:peer", args=[PEER_PLACEHOLDER])
    html = [
        ROW.format(
            state=escape(row["display_state"]),
            peer_id=escape(row["peer_id"]),
            url=escape(peer_url.replace(PEER_PLACEHOLDER, row["peer_id"])),
            short_peer_id=escape(row["short_peer_id"]),
            contributor=_contributor(row),
            version=escape(row["version_short"]),
            throughput=escape(row["throughput_text"]),
            precision=escape(row["precision"]),
            adapters=_adapters(row["adapters"] or []),
            cache=escape(row["cache_text"]),
            connection=escape(row["connection"]),
            latency=escape(row["latency_text"]),
            start=int(row["start"]),
            end=int(row["end"]),
            left=escape(row["bar_left"]),
            width=escape(row["bar_width"]),
            detail=_detail(row, peer_url),
        )
        for row in rows
    ]
    return mark_safe("".join(html))  # every value above is escaped
