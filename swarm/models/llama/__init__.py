"""Llama-shaped decoders (Llama 2/3/3.1, Mistral): same block layout and checkpoint names."""

from __future__ import annotations

from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding
from transformers.models.mistral.modeling_mistral import (
    MistralDecoderLayer,
    MistralRMSNorm,
    MistralRotaryEmbedding,
)

from swarm.models.family import ModelFamily, register_family

LLAMA = register_family(
    ModelFamily(
        model_types=("llama",),
        make_block=lambda config, index: LlamaDecoderLayer(config, layer_idx=index),
        make_rotary=LlamaRotaryEmbedding,
        make_norm=lambda config: LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps),
    )
)

MISTRAL = register_family(
    ModelFamily(
        model_types=("mistral",),
        make_block=lambda config, index: MistralDecoderLayer(config, layer_idx=index),
        make_rotary=MistralRotaryEmbedding,
        make_norm=lambda config: MistralRMSNorm(config.hidden_size, eps=config.rms_norm_eps),
    )
)
