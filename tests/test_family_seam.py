"""The family seam's pure pieces: registry, masks, MoE weight fusion, checkpoint names, cache layouts."""

from __future__ import annotations

import pytest
import torch
from transformers import BloomConfig, DeepseekV3Config, FalconConfig, Gemma3TextConfig, MistralConfig

from swarm.models.experts import fuse_experts
from swarm.models.family import CheckpointNames, LayerAttention
from swarm.models.registry import UnsupportedModelError, family_for, family_for_type, supported_model_types
from swarm.server.attention_masks import attention_mask, needs_mask

FAMILIES = ["bloom", "deepseek_v3", "falcon", "gemma2", "gemma3_text", "llama", "mistral", "mixtral"]
FAMILIES += ["qwen2", "qwen3", "qwen3_moe"]


def test_every_promised_family_is_registered() -> None:
    assert set(FAMILIES) <= set(supported_model_types())


def test_unknown_model_type_is_a_one_line_error_naming_the_families() -> None:
    with pytest.raises(UnsupportedModelError) as error:
        family_for_type("gpt_neox")
    assert "'gpt_neox'" in str(error.value) and "mixtral" in str(error.value) and "\n" not in str(error.value)


def test_falcon_with_alibi_is_refused_clearly() -> None:
    with pytest.raises(UnsupportedModelError, match="ALiBi"):
        family_for(FalconConfig(alibi=True))


def reference_mask(offset: int, length: int, window: int | None) -> torch.Tensor:
    rows = []
    for query in range(offset, offset + length):
        rows.append([key <= query and (window is None or query - key < window) for key in range(offset + length)])
    return torch.tensor(rows)[None, None]


@pytest.mark.parametrize(("offset", "length", "window"), [(0, 5, None), (3, 4, None), (0, 9, 3), (7, 1, 3), (4, 6, 4)])
def test_masks_are_causal_within_the_window(offset: int, length: int, window: int | None) -> None:
    expected = reference_mask(offset, length, window)
    boolean = attention_mask(offset, length, window, additive=False, dtype=torch.float32, device=torch.device("cpu"))
    assert torch.equal(boolean, expected)
    additive = attention_mask(offset, length, window, additive=True, dtype=torch.bfloat16, device=torch.device("cpu"))
    assert additive.dtype == torch.bfloat16
    assert torch.equal(additive == 0, expected)
    assert bool((additive[~expected] == torch.finfo(torch.bfloat16).min).all())


def test_masks_are_skipped_only_where_the_kernel_needs_none() -> None:
    assert not needs_mask(0, 8, None, additive=False, always=False)  # SDPA's causal flag
    assert needs_mask(0, 8, None, additive=True, always=False)  # eager attention has no causal flag
    assert needs_mask(5, 3, None, additive=False, always=False)  # a cached prefix shifts the diagonal
    assert not needs_mask(5, 1, None, additive=True, always=False)  # one new token sees everything
    assert not needs_mask(2, 1, 4, additive=False, always=False)  # the whole past fits the window
    assert needs_mask(4, 1, 4, additive=False, always=False)  # the oldest key fell out of the window
    assert needs_mask(0, 1, None, additive=False, always=True)


def test_per_expert_tensors_are_fused_as_transformers_fuses_them() -> None:
    gate = [torch.full((3, 2), float(i)) for i in range(4)]
    up = [torch.full((3, 2), 10.0 + i) for i in range(4)]
    down = [torch.full((2, 3), 20.0 + i) for i in range(4)]
    weights = {"mlp.gate.weight": torch.zeros(4, 2)}
    for i in range(4):
        weights |= {f"mlp.experts.{i}.w1.weight": gate[i], f"mlp.experts.{i}.w3.weight": up[i]}
        weights[f"mlp.experts.{i}.w2.weight"] = down[i]
    fused = fuse_experts(weights, experts="mlp.experts", gate="w1", up="w3", down="w2")
    assert set(fused) == {"mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"}
    assert fused["mlp.experts.gate_up_proj"].shape == (4, 6, 2)  # (experts, 2 * intermediate, hidden)
    assert torch.equal(fused["mlp.experts.gate_up_proj"][2], torch.cat([gate[2], up[2]]))
    assert torch.equal(fused["mlp.experts.down_proj"][3], down[3])
    assert fuse_experts(fused, experts="mlp.experts", gate="w1", up="w3", down="w2") == fused  # already fused


def test_fusing_refuses_a_checkpoint_missing_an_expert() -> None:
    weights = {f"mlp.experts.{i}.{k}.weight": torch.zeros(1) for i in (0, 2) for k in ("w1", "w2", "w3")}
    with pytest.raises(ValueError, match="incomplete"):
        fuse_experts(weights, experts="mlp.experts", gate="w1", up="w3", down="w2")


def test_bloom_checkpoints_with_and_without_the_base_prefix_resolve() -> None:
    names = family_for(BloomConfig()).checkpoint
    hub = names.resolve(["h.0.input_layernorm.weight", "word_embeddings.weight", "ln_f.weight"])
    assert hub.block_prefix(3) == "h.3." and hub.embeddings == "word_embeddings.weight"
    assert hub.embedding_norm == "word_embeddings_layernorm." and hub.lm_head == "lm_head.weight"
    saved = names.resolve(["transformer.h.0.input_layernorm.weight", "transformer.word_embeddings.weight"])
    assert saved.block_prefix(0) == "transformer.h.0." and saved.final_norm == "transformer.ln_f."
    with pytest.raises(ValueError, match="none of the expected tensors"):
        CheckpointNames().resolve(["encoder.layer.0.weight"])


def test_layer_attention_follows_the_config() -> None:
    mistral = family_for(MistralConfig(sliding_window=16))
    assert mistral.layer_attention(MistralConfig(sliding_window=16), 3) == LayerAttention(sliding_window=16)
    config = Gemma3TextConfig(
        sliding_window=8, layer_types=["sliding_attention", "full_attention"], num_hidden_layers=2
    )
    gemma = family_for(config)
    assert gemma.layer_attention(config, 0) == LayerAttention(8, "sliding_attention")
    assert gemma.layer_attention(config, 1) == LayerAttention(None, "full_attention")


def test_cache_layouts_where_keys_and_values_differ_from_the_query_heads() -> None:
    falcon_7b = FalconConfig(hidden_size=64, num_attention_heads=4, multi_query=True, new_decoder_architecture=False)
    assert family_for(falcon_7b).cache_layout(falcon_7b, 0).key_heads == 1
    falcon_40b = FalconConfig(hidden_size=64, num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=True)
    assert family_for(falcon_40b).cache_layout(falcon_40b, 0).key_heads == 4  # transformers broadcasts them
    deepseek = DeepseekV3Config(kv_lora_rank=16, qk_rope_head_dim=8)
    layout = family_for(deepseek).cache_layout(deepseek, 0)
    assert (layout.key_heads, layout.key_dim, layout.value_heads, layout.value_dim) == (1, 16, 1, 8)
