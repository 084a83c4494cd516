"""Families register themselves here; the engine finds them by a config's `model_type`.

Every module of the `swarm.models` package is imported once, on the first lookup, so a new
family is one new module and no engine change.
"""

from __future__ import annotations

import importlib
import pkgutil

import torch
from torch import nn
from transformers import PretrainedConfig

import swarm.models
from swarm.checkpoint import is_local_checkpoint
from swarm.models.family import ModelFamily

_FAMILIES: dict[str, ModelFamily] = {}
_SEAM_MODULES = {"family", "registry", "experts"}  # the seam itself, not families
_discovered = False


class UnsupportedModelError(ValueError):
    """A checkpoint of an architecture no family serves."""


def register_family(family: ModelFamily) -> ModelFamily:
    for model_type in family.model_types:
        _FAMILIES[model_type] = family
    return family


def _discover() -> None:
    global _discovered
    if not _discovered:
        for module in pkgutil.iter_modules(swarm.models.__path__):
            if module.name not in _SEAM_MODULES:
                importlib.import_module(f"swarm.models.{module.name}")
        _discovered = True


def supported_model_types() -> list[str]:
    _discover()
    return sorted(_FAMILIES)


def family_for_type(model_type: str) -> ModelFamily:
    _discover()
    try:
        return _FAMILIES[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported (supported: {', '.join(supported_model_types())})"
        ) from None


def family_for(config: PretrainedConfig) -> ModelFamily:
    family = family_for_type(config.model_type)
    family.check_config(config)
    return family


def prepare_config(config: PretrainedConfig) -> PretrainedConfig:
    """Set the attention implementation the family's blocks run with (the engine builds their masks)."""
    config._attn_implementation = family_for(config).attn_implementation(config)
    return config


def dht_prefix_for(name_or_path: str, model_type: str, *, is_local: bool | None = None) -> str:
    """The DHT prefix Petals uses for this repository (or local folder) and architecture.

    >>> dht_prefix_for("meta-llama/Meta-Llama-3.1-70B", "llama", is_local=False)
    'Meta-Llama-3-1-70B-hf'
    >>> dht_prefix_for("bigscience/bloom", "bloom", is_local=False)
    'bigscience/bloom-petals'
    """
    if is_local is None:
        is_local = is_local_checkpoint(name_or_path)
    return family_for_type(model_type).dht_prefix(name_or_path, is_local=is_local)


def bytes_per_block(config: PretrainedConfig, dtype: torch.dtype) -> int:
    """Weight bytes of the largest block (MoE experts included), from the config without building weights."""
    family = family_for(config)
    element = torch.finfo(dtype).bits // 8
    largest = 0
    # Blocks of one model may differ (DeepSeek's first dense layers); a few distinct layer kinds at most.
    for index in sorted({0, family.num_blocks(config) - 1}):
        with torch.device("meta"):
            block: nn.Module = family.make_block(config, index)
        largest = max(largest, sum(p.numel() for p in block.parameters()))
    return largest * element
