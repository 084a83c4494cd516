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
from swarm.models.family import ModelFamily
from swarm.models.registry import register_family

QWEN2 = register_family(
    ModelFamily(
        name="Qwen2",
        model_types=("qwen2",),
        make_block=lambda config, index: Qwen2DecoderLayer(config, layer_idx=index),
        make_norm=lambda config: Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps),
        make_rotary=Qwen2RotaryEmbedding,
    )
)

QWEN3 = register_family(
    ModelFamily(
        name="Qwen3",
        model_types=("qwen3",),
        make_block=lambda config, index: Qwen3DecoderLayer(config, layer_idx=index),
        make_norm=lambda config: Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps),
        make_rotary=Qwen3RotaryEmbedding,
    )
)

QWEN3_MOE = register_family(
    ModelFamily(
        name="Qwen3-MoE",
        model_types=("qwen3_moe",),
        make_block=lambda config, index: Qwen3MoeDecoderLayer(config, layer_idx=index),
        make_norm=lambda config: Qwen3MoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps),
        make_rotary=Qwen3MoeRotaryEmbedding,
        convert_block_weights=lambda weights, config: fuse_experts(
            weights, experts="mlp.experts", gate="gate_proj", up="up_proj", down="down_proj"
        ),
    )
)
