"""DeepSeek-V3: multi-head latent attention (the cache holds a compressed latent and a shared rotary key,
of different sizes) and sparse MoE layers after the first dense ones."""

from __future__ import annotations

from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3DecoderLayer,
    DeepseekV3RMSNorm,
    DeepseekV3RotaryEmbedding,
)

from swarm.models.experts import fuse_experts
from swarm.models.family import CacheLayout, decoder_family
from swarm.models.registry import register_family


def _latent_cache(config, index: int) -> CacheLayout:
    return CacheLayout(1, config.kv_lora_rank, 1, config.qk_rope_head_dim)


DEEPSEEK_V3 = register_family(
    decoder_family(
        "DeepSeek-V3",
        ("deepseek_v3",),
        DeepseekV3DecoderLayer,
        DeepseekV3RMSNorm,
        DeepseekV3RotaryEmbedding,
        cache_layout=_latent_cache,
        cache_to_attention=False,  # its cache holds compressed latents, expanded before attention
        convert_block_weights=lambda weights, config: fuse_experts(
            weights, experts="mlp.experts", gate="gate_proj", up="up_proj", down="down_proj"
        ),
    )
)
