"""Mistral: Llama-shaped, with sliding-window attention on every layer when the config sets one."""

from __future__ import annotations

from transformers.models.mistral.modeling_mistral import MistralDecoderLayer, MistralRMSNorm, MistralRotaryEmbedding

from swarm.models.family import decoder_family
from swarm.models.registry import register_family

MISTRAL = register_family(
    decoder_family("Mistral", ("mistral",), MistralDecoderLayer, MistralRMSNorm, MistralRotaryEmbedding)
)
