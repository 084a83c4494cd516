"""Sequence classification through the swarm, as Petals' `AutoDistributedModelForSequenceClassification`.

The blocks run on the servers; the client adds a trainable `score` head (hidden -> labels) read at
each sequence's last token, and usually trainable prompts (`tuning_mode`). Batches of different
lengths are padded on the right: causal blocks never let a token see the padding after it.
"""

from __future__ import annotations

from typing import Any

import torch
from hivemind import DHT
from torch import nn
from transformers import PretrainedConfig
from transformers.loss.loss_utils import ForSequenceClassificationLoss
from transformers.modeling_outputs import SequenceClassifierOutputWithPast

from swarm.client.distributed import DistributedPreTrainedModel, load_distributed_model
from swarm.client.routing import SequenceManager
from swarm.models.family import ModelFamily


class DistributedModelForSequenceClassification(DistributedPreTrainedModel):
    config_keywords = (
        *DistributedPreTrainedModel.config_keywords,
        "num_labels",
        "id2label",
        "label2id",
        "problem_type",
    )

    def __init__(self, config: PretrainedConfig, family: ModelFamily, manager: SequenceManager, dht: DHT):
        super().__init__(config, family, manager, dht)
        self.num_labels = config.num_labels
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False, dtype=torch.float32)
        nn.init.normal_(self.score.weight, std=getattr(config, "initializer_range", 0.02))

    def float32_modules(self) -> list[nn.Module]:
        return [*super().float32_modules(), self.score]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = True,
        **kwargs: Any,
    ) -> SequenceClassifierOutputWithPast:
        hidden = self.transformer(input_ids, inputs_embeds, attention_mask)
        last = self._last_token_positions(input_ids, attention_mask, hidden.shape[:2])
        pooled = self.score(hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float())
        loss = None
        if labels is not None:
            loss = ForSequenceClassificationLoss(labels=labels, pooled_logits=pooled, config=self.config)
        return SequenceClassifierOutputWithPast(loss=loss, logits=pooled)

    def _last_token_positions(
        self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, shape: torch.Size
    ) -> torch.Tensor:
        batch, length = shape
        if attention_mask is not None:
            return attention_mask.long().sum(dim=1) - 1
        pad_token_id = getattr(self.config, "pad_token_id", None)
        if input_ids is not None and pad_token_id is not None:
            # The rightmost token that is not padding (transformers' rule for these models).
            positions = torch.arange(length, device=input_ids.device)
            return ((input_ids != pad_token_id).long() * positions).argmax(dim=-1)
        return torch.full((batch,), length - 1, dtype=torch.long)


class AutoDistributedModelForSequenceClassification:
    """Entry point, named like transformers' Auto classes (and Petals')."""

    @staticmethod
    def from_pretrained(name_or_path: str, **kwargs: Any) -> DistributedModelForSequenceClassification:
        """Keywords as `AutoDistributedModelForCausalLM.from_pretrained`, plus `num_labels`, `id2label`,
        `label2id` and `problem_type`."""
        return load_distributed_model(DistributedModelForSequenceClassification, name_or_path, **kwargs)
