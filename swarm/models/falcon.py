"""Falcon: 7B-style (multi-query, parallel attention) and 40B/180B-style (`new_decoder_architecture`)."""

from __future__ import annotations

from torch import nn
from transformers.models.falcon.modeling_falcon import FalconDecoderLayer, FalconRotaryEmbedding

from swarm.models.family import BlockInputs, CacheLayout, CheckpointNames, ModelFamily
from swarm.models.registry import UnsupportedModelError, register_family


def _call(block: nn.Module, hidden, inputs: BlockInputs):
    output, _ = block(
        hidden,
        alibi=None,
        attention_mask=inputs.attention_mask,
        position_ids=inputs.position_ids,
        layer_past=inputs.cache,
        position_embeddings=inputs.position_embeddings,
    )
    return output


def _cache_layout(config, index: int) -> CacheLayout:
    # transformers' Falcon caches keys and values after broadcasting them to every query head in the
    # new decoder architecture, and one shared head in the 7B-style multi-query layout.
    head_dim = config.hidden_size // config.num_attention_heads
    if config.new_decoder_architecture:
        heads = config.num_attention_heads
    elif config.multi_query:
        heads = 1
    else:
        heads = config.num_kv_heads
    return CacheLayout(heads, head_dim, heads, head_dim)


def _check(config) -> None:
    if config.alibi:
        raise UnsupportedModelError("Falcon checkpoints with ALiBi positions (falcon-rw) are not supported")


FALCON = register_family(
    ModelFamily(
        name="Falcon",
        model_types=("falcon",),
        make_block=lambda config, index: FalconDecoderLayer(config, layer_idx=index),
        make_norm=lambda config: nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon),
        make_rotary=FalconRotaryEmbedding,
        call_block=_call,
        always_mask=True,  # FalconModel always hands its layers a mask
        cache_layout=_cache_layout,
        checkpoint=CheckpointNames(
            base_prefixes=("transformer.",), blocks="h.", embeddings="word_embeddings.weight", final_norm="ln_f."
        ),
        check_config=_check,
    )
)
