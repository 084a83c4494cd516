"""`{% load site_format %}`: the site-wide block-range and time notation (see config/formatting.py).

{{ span.start|block_range:span.end }}  → 0:8
{{ missing_blocks|block_ranges }}      → 0:3, 5:6
{{ snapshot.created_at|utc }}          → 2025-01-31 12:34:56 UTC
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from django import template

from config import formatting

register = template.Library()


@register.filter
def block_range(start: int, end: int) -> str:
    return formatting.block_range(start, end)


@register.filter
def block_ranges(blocks: Iterable[int]) -> str:
    return formatting.block_ranges(blocks)


@register.filter
def utc(moment: dt.datetime | float | int | None) -> str:
    return formatting.utc_time(moment)
