"""Prompt tuning, with Petals' names and semantics (`tuning_mode`, `pre_seq_len`).

The servers' blocks stay frozen; what trains lives on the client:
- "ptune": `pre_seq_len` trainable embeddings prepended to every sequence before the first block;
- "deep_ptune": those, plus one trainable prompt per block, added to the prefix positions'
  hidden states before that block (sent to the servers with each request).
The prompts are kept in float32 whatever the model's dtype: they are all that learns.
"""

from __future__ import annotations

import torch
from torch import nn

TUNING_MODES = ("ptune", "deep_ptune")


def check_tuning_options(tuning_mode: str | None, pre_seq_len: int | None) -> None:
    if tuning_mode is None:
        if pre_seq_len:
            raise ValueError("pre_seq_len needs a tuning_mode ('ptune' or 'deep_ptune')")
        return
    if tuning_mode not in TUNING_MODES:
        raise ValueError(f"tuning_mode must be one of {', '.join(TUNING_MODES)} (or None), got {tuning_mode!r}")
    if isinstance(pre_seq_len, bool) or not isinstance(pre_seq_len, int) or pre_seq_len < 1:
        raise ValueError(f"tuning_mode={tuning_mode!r} needs pre_seq_len, a positive number of prefix tokens")


class PromptTuning(nn.Module):
    """The trainable prompts of one model: `forward(batch_size)` -> (prefix embeddings, per-block prompts)."""

    def __init__(self, tuning_mode: str, pre_seq_len: int, hidden_size: int, num_blocks: int, init_std: float):
        super().__init__()
        check_tuning_options(tuning_mode, pre_seq_len)
        self.tuning_mode, self.pre_seq_len, self.num_blocks = tuning_mode, pre_seq_len, num_blocks
        self.prompt_embeddings = nn.Embedding(pre_seq_len, hidden_size, dtype=torch.float32)
        nn.init.normal_(self.prompt_embeddings.weight, std=init_std)
        self.intermediate_prompt_embeddings = None
        if tuning_mode == "deep_ptune":
            # Zeros: training starts from plain ptune, and the blocks see unchanged inputs until it learns.
            self.intermediate_prompt_embeddings = nn.Embedding(pre_seq_len, num_blocks * hidden_size)
            nn.init.zeros_(self.intermediate_prompt_embeddings.weight)

    def forward(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(batch, pre_seq_len, hidden) prefix, and (blocks, batch, pre_seq_len, hidden) deep prompts or None."""
        prefix = self.prompt_embeddings.weight.unsqueeze(0).expand(batch_size, -1, -1)
        if self.intermediate_prompt_embeddings is None:
            return prefix, None
        deep = self.intermediate_prompt_embeddings.weight.view(self.pre_seq_len, self.num_blocks, -1)
        return prefix, deep.permute(1, 0, 2).unsqueeze(1).expand(-1, batch_size, -1, -1)
