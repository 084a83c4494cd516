"""BLOOM: ALiBi positions, a LayerNorm after the embeddings, tied LM head. Petals prefix: `owner/name-petals`."""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.bloom.modeling_bloom import BloomBlock, _get_alibi_slopes

from swarm.models.family import BlockInputs, CacheLayout, CheckpointNames, ModelFamily, PrefixConvention
from swarm.models.registry import register_family


def _call(block: nn.Module, hidden, inputs: BlockInputs):
    output, _ = block(hidden, alibi=inputs.alibi, attention_mask=inputs.attention_mask, layer_past=inputs.cache)
    return output


def _alibi(config, batch: int, kv_length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # As BloomModel builds it without padding: one bias per head and key position, (batch * heads, 1, keys).
    slopes = _get_alibi_slopes(config.n_head, device)
    alibi = slopes[:, None, None] * torch.arange(kv_length, device=device)
    return alibi.repeat(batch, 1, 1).to(dtype)


def _layer_norm(config) -> nn.Module:
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)


def _cache_layout(config, index: int) -> CacheLayout:
    head_dim = config.hidden_size // config.n_head
    return CacheLayout(config.n_head, head_dim, config.n_head, head_dim)


BLOOM = register_family(
    ModelFamily(
        name="BLOOM",
        model_types=("bloom",),
        make_block=lambda config, index: BloomBlock(config, layer_idx=index),
        make_norm=_layer_norm,
        make_alibi=_alibi,
        call_block=_call,
        attn_implementation=lambda config: "eager",  # BLOOM's attention adds float masks to its scores
        cache_layout=_cache_layout,
        # bigscience's own checkpoints have no base prefix; ones saved by BloomForCausalLM have `transformer.`.
        checkpoint=CheckpointNames(
            base_prefixes=("transformer.", ""),
            blocks="h.",
            embeddings="word_embeddings.weight",
            embedding_norm="word_embeddings_layernorm.",
            final_norm="ln_f.",
        ),
        make_embedding_norm=_layer_norm,
        dht_prefix=PrefixConvention(keep_owner=True, suffix="-petals"),
    )
)
