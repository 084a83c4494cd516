"""Llama 2 / 3 / 3.1 (rope scaling comes with transformers' rotary module). Petals prefix: `<Name>-hf`."""

from __future__ import annotations

from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from swarm.models.family import PrefixConvention, decoder_family
from swarm.models.registry import register_family

LLAMA = register_family(
    decoder_family(
        "Llama",
        ("llama",),
        LlamaDecoderLayer,
        LlamaRMSNorm,
        LlamaRotaryEmbedding,
        dht_prefix=PrefixConvention(suffix="-hf"),
    )
)
