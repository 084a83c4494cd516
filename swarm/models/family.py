"""The seam between the engine and one model architecture.

A family says how to build one transformer block with the architecture's own transformers
classes (attention, RoPE and GQA come from transformers), where its tensors live in a
checkpoint, and how to build the client-side pieces (embeddings, final norm, LM head).
Other families plug in by registering another `ModelFamily`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn
from transformers import PretrainedConfig


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    model_types: tuple[str, ...]
    make_block: Callable[[PretrainedConfig, int], nn.Module]  # (config, layer index) -> decoder layer
    make_rotary: Callable[[PretrainedConfig], nn.Module]  # shared (cos, sin) position embeddings
    make_norm: Callable[[PretrainedConfig], nn.Module]  # the final norm before the LM head
    block_prefix: str = "model.layers."
    embeddings_key: str = "model.embed_tokens.weight"
    norm_prefix: str = "model.norm."
    lm_head_key: str = "lm_head.weight"

    def block_tensor_prefix(self, index: int) -> str:
        return f"{self.block_prefix}{index}."

    def num_blocks(self, config: PretrainedConfig) -> int:
        return config.num_hidden_layers


_FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    for model_type in family.model_types:
        _FAMILIES[model_type] = family
    return family


def family_for(config: PretrainedConfig) -> ModelFamily:
    import swarm.models.llama  # noqa: F401  (registers the Llama family)

    try:
        return _FAMILIES[config.model_type]
    except KeyError:
        supported = ", ".join(sorted(_FAMILIES))
        raise ValueError(f"model type {config.model_type!r} is not supported yet (supported: {supported})") from None


def prepare_config(config: PretrainedConfig) -> PretrainedConfig:
    """Use SDPA attention: the engine passes explicit masks only where SDPA's causal flag cannot."""
    config._attn_implementation = "sdpa"
    return config


def bytes_per_block(config: PretrainedConfig, dtype: torch.dtype) -> int:
    """Weight bytes of one block, computed from the config without building it."""
    with torch.device("meta"):
        block = family_for(config).make_block(config, 0)
    element = torch.finfo(dtype).bits // 8
    return sum(p.numel() for p in block.parameters()) * element
