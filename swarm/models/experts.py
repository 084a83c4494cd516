"""Sparse-MoE checkpoints store one tensor per expert; transformers' modules hold them fused.

transformers converts while loading whole models; a block server loads single layers, so the
families with experts convert their block's tensors with these helpers.
"""

from __future__ import annotations

import re

import torch


def fuse_experts(
    weights: dict[str, torch.Tensor], *, experts: str, gate: str, up: str, down: str
) -> dict[str, torch.Tensor]:
    """`{experts}.{i}.{gate|up|down}.weight` -> `{experts}.gate_up_proj` (E, 2I, H) and `{experts}.down_proj` (E, H, I).

    Checkpoints already in the fused layout pass through unchanged.
    """
    pattern = re.compile(rf"^{re.escape(experts)}\.(\d+)\.({gate}|{up}|{down})\.weight$")
    per_expert: dict[str, dict[int, torch.Tensor]] = {gate: {}, up: {}, down: {}}
    fused: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        match = pattern.match(name)
        if match:
            per_expert[match.group(2)][int(match.group(1))] = tensor
        else:
            fused[name] = tensor
    if not per_expert[gate]:
        return fused

    def stacked(kind: str) -> torch.Tensor:
        tensors = per_expert[kind]
        if sorted(tensors) != list(range(len(tensors))):
            raise ValueError(f"the checkpoint's {experts}.*.{kind} tensors are incomplete")
        return torch.stack([tensors[i] for i in range(len(tensors))])

    fused[f"{experts}.gate_up_proj"] = torch.cat([stacked(gate), stacked(up)], dim=1)
    fused[f"{experts}.down_proj"] = stacked(down)
    return fused


def rename_prefix(weights: dict[str, torch.Tensor], old: str, new: str) -> dict[str, torch.Tensor]:
    return {(new + name[len(old) :] if name.startswith(old) else name): tensor for name, tensor in weights.items()}
