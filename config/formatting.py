"""The site's one notation for block ranges and one time format (status pages, chat, APIs' messages).

Block ranges are written as Python slices, end exclusive, exactly as `--block-indices 0:8` takes
them on the command line; times as `2025-01-31 12:34:56 UTC`. Templates use the filters in
`config/templatetags/site_format.py`, scripts the same rules in `static/js/format.js`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

TIME_FORMAT = "%Y-%m-%d %H:%M:%S UTC"


def block_range(start: int, end: int) -> str:
    """Blocks [start, end) → '0:8'."""
    return f"{start}:{end}"


def block_ranges(blocks: Iterable[int]) -> str:
    """Block indices → their runs as slices: [0, 1, 2, 5, 7, 8] → '0:3, 5:6, 7:9'."""
    runs: list[list[int]] = []
    for block in sorted(set(blocks)):
        if runs and block == runs[-1][1]:
            runs[-1][1] = block + 1
        else:
            runs.append([block, block + 1])
    return ", ".join(block_range(start, end) for start, end in runs)


def shorten(text: str, limit: int) -> str:
    """Text cut to `limit` characters, the last one an ellipsis where it was cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def utc_time(moment: dt.datetime | float | int | None) -> str:
    """A datetime (naive means UTC) or a unix time → '2025-01-31 12:34:56 UTC'; '' for None."""
    if moment is None:
        return ""
    if isinstance(moment, (int, float)):
        moment = dt.datetime.fromtimestamp(moment, dt.UTC)
    elif moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(dt.UTC).strftime(TIME_FORMAT)
