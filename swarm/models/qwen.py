"""Qwen 2 / 2.5, Qwen 3 and Qwen 3 MoE: Llama-shaped (QKV biases, QK norms, experts come with the layers)."""

from __future__ import annotations

from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RMSNorm, Qwen3RotaryEmbedding
from transformers.models.qwen3_moe.modeling_qwen3_moe import (
    Qwen3MoeDecoderLayer,
    Qwen3MoeRMSNorm,
    Qwen3MoeRotaryEmbedding,
)

from swarm.models.experts import fuse_experts
from swarm.models.family import decoder_family
from swarm.models.registry import register_family

QWEN2 = register_family(decoder_family("Qwen2", ("qwen2",), Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding))

QWEN3 = register_family(decoder_family("Qwen3", ("qwen3",), Qwen3DecoderLayer, Qwen3RMSNorm, Qwen3RotaryEmbedding))

QWEN3_MOE = register_family(
    decoder_family(
        "Qwen3-MoE",
        ("qwen3_moe",),
        Qwen3MoeDecoderLayer,
        Qwen3MoeRMSNorm,
        Qwen3MoeRotaryEmbedding,
        convert_block_weights=lambda weights, config: fuse_experts(
            weights, experts="mlp.experts", gate="gate_proj", up="up_proj", down="down_proj"
        ),
    )
)
