"""Local reference for prompt tuning: the same prompts applied to a local transformers model."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel


def local_logits_with_prompts(
    model: PreTrainedModel, input_ids: torch.Tensor, prefix: torch.Tensor, deep: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits of input_ids' positions with `prefix` (batch, P, hidden) prepended and, if given, `deep`
    (blocks, batch, P, hidden) added to the prefix positions before each block, as Petals defines them."""
    length = prefix.shape[1]
    hidden = torch.cat([prefix, model.get_input_embeddings()(input_ids)], dim=1)
    handles = []
    if deep is not None:
        for index, layer in enumerate(model.model.layers):

            def add_prompt(module, args, kwargs, index=index):
                states = args[0] if args else kwargs["hidden_states"]
                states = torch.cat([states[:, :length] + deep[index], states[:, length:]], dim=1)
                if args:
                    return (states, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": states}

            handles.append(layer.register_forward_pre_hook(add_prompt, with_kwargs=True))
    try:
        return model(inputs_embeds=hidden).logits[:, length:]
    finally:
        for handle in handles:
            handle.remove()


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
