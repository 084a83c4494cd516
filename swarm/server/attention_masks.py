"""Attention masks for a step of `length` new tokens after `offset` cached ones.

Causal with an optional sliding window (a query at position i sees keys j with i - window < j <= i,
as transformers defines it). A mask is built only where the attention kernel needs one: SDPA's
causal flag covers a fresh causal prefix, and a lone new token may see every cached one.
"""

from __future__ import annotations

import torch


def needs_mask(offset: int, length: int, window: int | None, *, additive: bool, always: bool) -> bool:
    if always or (window is not None and offset + length > window):
        return True
    # Eager attention has no causal flag; SDPA's aligns top-left, so a cached prefix needs a mask.
    return length > 1 and (additive or offset > 0)


def attention_mask(
    offset: int,
    length: int,
    window: int | None,
    *,
    additive: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """(1, 1, length, offset + length): booleans (True = attend) or additive floats (0 or the dtype's min)."""
    queries = torch.arange(offset, offset + length, device=device)[None, :, None]
    keys = torch.arange(offset + length, device=device)[None, None, :]
    return _mask(queries, keys, window, additive, dtype)


def stacked_attention_mask(
    offsets: torch.Tensor,
    length: int,
    window: int | None,
    *,
    additive: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """(rows, 1, length, max(offsets) + length) for rows that each continue their own cached prefix.

    Row r's keys are its `offsets[r]` cached tokens then its new ones, padded on the right to the
    longest row; the padding is masked out with everything after each query.
    """
    queries = offsets[:, None, None] + torch.arange(length, device=device)[None, :, None]  # (rows, length, 1)
    keys = torch.arange(int(offsets.max()) + length, device=device)[None, None, :]
    return _mask(queries, keys, window, additive, dtype)


def _mask(queries: torch.Tensor, keys: torch.Tensor, window: int | None, additive: bool, dtype: torch.dtype):
    """(rows, 1, queries, keys) from query and key positions broadcast as (rows, queries, 1) and (1, 1, keys)."""
    allowed = keys <= queries
    if window is not None:
        allowed &= queries - keys < window
    allowed = allowed[:, None]
    if not additive:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=queries.device).masked_fill(~allowed, torch.finfo(dtype).min)
