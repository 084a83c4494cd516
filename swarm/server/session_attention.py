"""Attention for sessions stepping together, each over its own cache: nothing is copied per step.

Sessions stacked into one forward share the projections and the MLP (one matmul over all their rows), but
their caches differ in length. Instead of copying every session's cached keys and values into one padded
tensor per layer (O(sessions x position) bytes per token), the stacked cache hands attention each session's
own cache views (`SessionParts`), and the attention function registered here as `ATTENTION_NAME` runs
transformers' SDPA attention once per session on its rows, with that session's own mask: what the session
would compute alone. Plain tensors go to SDPA unchanged, so a backend can use this name for every step.

Only families whose layers call transformers' attention interface can use it (Falcon and BLOOM run their own
attention code; they keep the padded copies).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

ATTENTION_NAME = "swarm_sessions_sdpa"


@dataclasses.dataclass
class SessionParts:
    """Per-session tensors standing in for one stacked tensor: `parts[i]` belongs to `rows[i]` rows of the batch."""

    parts: list[torch.Tensor | None]
    rows: list[int]


def sessions_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor | SessionParts,
    value: torch.Tensor | SessionParts,
    attention_mask: torch.Tensor | SessionParts | None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    if not isinstance(key, SessionParts):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outputs, row = [], 0
    masks = attention_mask.parts if isinstance(attention_mask, SessionParts) else [None] * len(key.rows)
    for keys, values, mask, rows in zip(key.parts, value.parts, masks, key.rows, strict=True):
        output, _ = sdpa_attention_forward(module, query[row : row + rows], keys, values, mask, **kwargs)
        outputs.append(output)
        row += rows
    return torch.cat(outputs), None


ALL_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sessions_sdpa)
