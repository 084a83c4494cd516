"""Gemma 2 and Gemma 3 (text): scaled embeddings, alternating local (sliding) and global layers,
(1 + w) RMSNorms, final logit soft-capping; Gemma 3's local and global layers use different rotary bases."""

from __future__ import annotations

from transformers.models.gemma2.modeling_gemma2 import (
    Gemma2DecoderLayer,
    Gemma2RMSNorm,
    Gemma2RotaryEmbedding,
    Gemma2TextScaledWordEmbedding,
)
from transformers.models.gemma3.modeling_gemma3 import (
    Gemma3DecoderLayer,
    Gemma3RMSNorm,
    Gemma3RotaryEmbedding,
    Gemma3TextScaledWordEmbedding,
)

from swarm.models.family import LayerAttention, attention_from_config, decoder_family
from swarm.models.registry import register_family


def _scaled_embeddings(embedding_class):
    def make(config):
        return embedding_class(
            config.vocab_size, config.hidden_size, config.pad_token_id, embed_scale=config.hidden_size**0.5
        )

    return make


def _gemma3_attention(config, index: int) -> LayerAttention:
    # Local and global layers take different rotary embeddings, named by their layer type.
    window = attention_from_config(config, index).sliding_window
    return LayerAttention(sliding_window=window, rope=config.layer_types[index])


def _eager_if_softcapped(config) -> str:
    return "eager" if getattr(config, "attn_logit_softcapping", None) is not None else "sdpa"


GEMMA2 = register_family(
    decoder_family(
        "Gemma2",
        ("gemma2",),
        Gemma2DecoderLayer,
        Gemma2RMSNorm,
        Gemma2RotaryEmbedding,
        attn_implementation=lambda config: "eager",  # as transformers runs it: SDPA cannot soft-cap
        make_embeddings=_scaled_embeddings(Gemma2TextScaledWordEmbedding),
    )
)

GEMMA3 = register_family(
    decoder_family(
        "Gemma3",
        ("gemma3_text",),
        Gemma3DecoderLayer,
        Gemma3RMSNorm,
        Gemma3RotaryEmbedding,
        rotary_for=lambda rotary, hidden, positions, rope: rotary(hidden, positions, rope),
        layer_attention=_gemma3_attention,
        attn_implementation=_eager_if_softcapped,
        make_embeddings=_scaled_embeddings(Gemma3TextScaledWordEmbedding),
    )
)
