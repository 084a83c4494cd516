"""Llama 2 / 3 / 3.1 (rope scaling comes with transformers' rotary module). Petals prefix: `<Name>-hf`."""

from __future__ import annotations

from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from swarm.models.family import ModelFamily, PrefixConvention
from swarm.models.registry import register_family

LLAMA = register_family(
    ModelFamily(
        name="Llama",
        model_types=("llama",),
        make_block=lambda config, index: LlamaDecoderLayer(config, layer_idx=index),
        make_norm=lambda config: LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps),
        make_rotary=LlamaRotaryEmbedding,
        dht_prefix=PrefixConvention(suffix="-hf"),
    )
)
