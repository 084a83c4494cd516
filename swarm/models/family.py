"""The seam between the engine and one model architecture.

A `ModelFamily` declares everything the engine needs to know about an architecture, and the
engine only asks it: the block class (transformers' own decoder layer) and how a block is
called, the position scheme (rotary embeddings, ALiBi), each layer's attention kind (causal or
sliding window), the KV cache layout, the client-side pieces (embeddings, final norm, LM head,
logit soft-capping), checkpoint tensor names, and the DHT prefix convention Petals uses.
Each family lives in its own module under `swarm/models/` and registers itself
(`swarm.models.registry`); a Llama-shaped family is a few lines.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

# ----- what the engine hands a block -----


@dataclasses.dataclass
class BlockInputs:
    """Everything one block call may need, prepared once per step for a span's layers."""

    attention_mask: torch.Tensor | None  # this layer's mask (None: plain causal, or nothing to mask)
    position_ids: torch.Tensor  # (batch, tokens), absolute positions
    position_embeddings: Any  # whatever the family's rotary module returned for this layer, or None
    alibi: torch.Tensor | None  # ALiBi biases for families that use them
    cache: Any  # the session's KV cache (transformers' `update()` protocol) or None


BlockCall = Callable[[nn.Module, torch.Tensor, BlockInputs], torch.Tensor]


def call_decoder_layer(block: nn.Module, hidden: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
    """transformers' current decoder layers (Llama and its descendants) return the hidden states."""
    return block(
        hidden,
        attention_mask=inputs.attention_mask,
        position_ids=inputs.position_ids,
        cache=inputs.cache,
        position_embeddings=inputs.position_embeddings,
    )


# ----- per-layer attention and cache layout -----


@dataclasses.dataclass(frozen=True)
class LayerAttention:
    """How one layer attends: causal over everything, or over the last `sliding_window` tokens.

    `rope` names the position embeddings the layer takes, for families whose local and global
    layers use different rotary bases (Gemma 3).
    """

    sliding_window: int | None = None
    rope: str = "default"


def attention_from_config(config: PretrainedConfig, index: int) -> LayerAttention:
    """transformers' convention: `layer_types` when the config has it, else one `sliding_window` for all."""
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if layer_types:
        kind = layer_types[index]
        return LayerAttention(sliding_window=window if kind == "sliding_attention" else None)
    return LayerAttention(sliding_window=window)


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """Shape of one layer's cached keys and values per token: (heads, head size) each."""

    key_heads: int
    key_dim: int
    value_heads: int
    value_dim: int

    def bytes_per_token(self, element_size: int) -> int:
        return (self.key_heads * self.key_dim + self.value_heads * self.value_dim) * element_size


def head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def grouped_query_cache(config: PretrainedConfig, index: int) -> CacheLayout:
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return CacheLayout(heads, head_dim(config), heads, head_dim(config))


# ----- checkpoint names and the client's pieces -----


@dataclasses.dataclass(frozen=True)
class CheckpointNames:
    """Where a family's tensors live in a checkpoint, relative to the base model's prefix.

    Checkpoints of one family differ in that prefix (BLOOM's own repositories have none, ones
    saved by `BloomForCausalLM` have `transformer.`), so `base_prefixes` lists the candidates
    and `resolve()` picks the one the checkpoint uses.
    """

    base_prefixes: tuple[str, ...] = ("model.",)
    blocks: str = "layers."
    embeddings: str = "embed_tokens.weight"
    embedding_norm: str | None = None  # BLOOM's LayerNorm right after the embeddings
    final_norm: str = "norm."
    lm_head: str = "lm_head.weight"  # outside the base model; absent when tied to the embeddings

    def resolve(self, tensor_names: list[str] | set[str]) -> ResolvedNames:
        names = set(tensor_names)
        for base in self.base_prefixes:
            if base + self.embeddings in names or any(n.startswith(base + self.blocks) for n in names):
                return ResolvedNames(self, base)
        expected = " or ".join(base + self.blocks for base in self.base_prefixes)
        raise ValueError(f"the checkpoint has none of the expected tensors ({expected}…)")


@dataclasses.dataclass(frozen=True)
class ResolvedNames:
    names: CheckpointNames
    base: str

    def block_prefix(self, index: int) -> str:
        return f"{self.base}{self.names.blocks}{index}."

    @property
    def embeddings(self) -> str:
        return self.base + self.names.embeddings

    @property
    def embedding_norm(self) -> str | None:
        return self.base + self.names.embedding_norm if self.names.embedding_norm else None

    @property
    def final_norm(self) -> str:
        return self.base + self.names.final_norm

    @property
    def lm_head(self) -> str:
        return self.names.lm_head


def plain_embeddings(config: PretrainedConfig) -> nn.Module:
    return nn.Embedding(config.vocab_size, config.hidden_size)


def final_logit_softcap(config: PretrainedConfig) -> float | None:
    return getattr(config, "final_logit_softcapping", None)


# ----- DHT prefixes -----


@dataclasses.dataclass(frozen=True)
class PrefixConvention:
    """How Petals derives a model's DHT prefix from a Hub repository `owner/Name-1.5`.

    Dots become dashes; `keep_owner` keeps the `owner/` part (Mixtral, BLOOM); `suffix` is
    appended unless the name already ends with it (Llama's `-hf`, BLOOM's `-petals`). A local
    folder is named by its basename with the same suffix.
    """

    keep_owner: bool = False
    suffix: str = ""

    def __call__(self, name_or_path: str, *, is_local: bool) -> str:
        name = name_or_path.rstrip("/")
        if is_local or not self.keep_owner:
            name = name.split("/")[-1]
        if self.suffix and not name.endswith(self.suffix):
            name += self.suffix
        return name.replace(".", "-")


# ----- the family -----


def _identity(weights: dict[str, torch.Tensor], config: PretrainedConfig) -> dict[str, torch.Tensor]:
    return weights


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """Everything about one architecture that the engine asks; defaults fit Llama-shaped decoders."""

    name: str
    model_types: tuple[str, ...]
    make_block: Callable[[PretrainedConfig, int], nn.Module]  # (config, layer index) -> decoder layer
    make_norm: Callable[[PretrainedConfig], nn.Module]  # the final norm before the LM head
    # Positions: a rotary module (called once per step and rope kind), or ALiBi biases, or neither.
    make_rotary: Callable[[PretrainedConfig], nn.Module] | None = None
    rotary_for: Callable[[nn.Module, torch.Tensor, torch.Tensor, str], Any] = lambda rotary, hidden, positions, rope: (
        rotary(hidden, positions)
    )
    make_alibi: Callable[[PretrainedConfig, int, int, torch.dtype, torch.device], torch.Tensor] | None = None
    call_block: BlockCall = call_decoder_layer
    layer_attention: Callable[[PretrainedConfig, int], LayerAttention] = attention_from_config
    # "sdpa" takes boolean masks and may skip them where SDPA's causal flag suffices; "eager" needs
    # additive float masks (Gemma 2's attention soft-capping, BLOOM).
    attn_implementation: Callable[[PretrainedConfig], str] = lambda config: "sdpa"
    always_mask: bool = False  # pass a mask even where none is needed, as the family's own model does
    # Whether the layers hand what the cache's update() returns straight to transformers' attention interface,
    # so that stacked sessions can attend each over its own cache (swarm.server.session_attention).
    cache_to_attention: bool = True
    cache_layout: Callable[[PretrainedConfig, int], CacheLayout] = grouped_query_cache
    checkpoint: CheckpointNames = CheckpointNames()
    # Checkpoint layout -> transformers' module layout (e.g. per-expert MoE tensors -> fused ones).
    convert_block_weights: Callable[[dict[str, torch.Tensor], PretrainedConfig], dict[str, torch.Tensor]] = _identity
    make_embeddings: Callable[[PretrainedConfig], nn.Module] = plain_embeddings
    make_embedding_norm: Callable[[PretrainedConfig], nn.Module] | None = None
    logit_softcap: Callable[[PretrainedConfig], float | None] = final_logit_softcap
    dht_prefix: PrefixConvention = PrefixConvention()
    check_config: Callable[[PretrainedConfig], None] = lambda config: None  # raise for unsupported variants

    def num_blocks(self, config: PretrainedConfig) -> int:
        return config.num_hidden_layers


def decoder_family(
    name: str,
    model_types: tuple[str, ...],
    layer_class: type[nn.Module],
    norm_class: type[nn.Module],
    rotary_class: type[nn.Module],
    **options: Any,
) -> ModelFamily:
    """A family of transformers' current decoder layers: `Layer(config, layer_idx)`, an RMSNorm, a rotary module."""
    return ModelFamily(
        name=name,
        model_types=model_types,
        make_block=lambda config, index: layer_class(config, layer_idx=index),
        make_norm=lambda config: norm_class(config.hidden_size, eps=config.rms_norm_eps),
        make_rotary=rotary_class,
        **options,
    )


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap
