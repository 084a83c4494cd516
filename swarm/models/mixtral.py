"""Mixtral: a Mistral-shaped sparse MoE. Petals names it by the whole repository (`owner/Name`)."""

from __future__ import annotations

from transformers.models.mixtral.modeling_mixtral import MixtralDecoderLayer, MixtralRMSNorm, MixtralRotaryEmbedding

from swarm.models.experts import fuse_experts, rename_prefix
from swarm.models.family import PrefixConvention, decoder_family
from swarm.models.registry import register_family


def _fused_experts(weights, config):
    # Hub checkpoints: block_sparse_moe.experts.{i}.w1 (gate), w3 (up), w2 (down).
    weights = rename_prefix(weights, "block_sparse_moe.", "mlp.")
    return fuse_experts(weights, experts="mlp.experts", gate="w1", up="w3", down="w2")


MIXTRAL = register_family(
    decoder_family(
        "Mixtral",
        ("mixtral",),
        MixtralDecoderLayer,
        MixtralRMSNorm,
        MixtralRotaryEmbedding,
        convert_block_weights=_fused_experts,
        dht_prefix=PrefixConvention(keep_owner=True),
    )
)
