"""Mistral: Llama-shaped, with sliding-window attention on every layer when the config sets one."""

from __future__ import annotations

from transformers.models.mistral.modeling_mistral import MistralDecoderLayer, MistralRMSNorm, MistralRotaryEmbedding

from swarm.models.family import ModelFamily
from swarm.models.registry import register_family

MISTRAL = register_family(
    ModelFamily(
        name="Mistral",
        model_types=("mistral",),
        make_block=lambda config, index: MistralDecoderLayer(config, layer_idx=index),
        make_norm=lambda config: MistralRMSNorm(config.hidden_size, eps=config.rms_norm_eps),
        make_rotary=MistralRotaryEmbedding,
    )
)
