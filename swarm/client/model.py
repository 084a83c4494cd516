"""The distributed causal LM: embeddings and LM head here, transformer blocks on the swarm.

`AutoDistributedModelForCausalLM.from_pretrained(name_or_path, initial_peers=[...])` loads only
the config, embeddings, final norm and LM head, and returns a real transformers
`GenerationMixin` model: `generate()` works with its usual arguments (greedy, sampling,
top-k/top-p, temperature, repetition penalty, beam search, stop strings, streamers).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from hivemind import DHT
from torch import nn
from transformers import Cache, GenerationConfig, GenerationMixin, PretrainedConfig
from transformers.modeling_outputs import CausalLMOutputWithPast

from swarm.client.distributed import DistributedPreTrainedModel, load_distributed_model
from swarm.client.inference_session import InferenceSession
from swarm.client.routing import SequenceManager
from swarm.models.family import ModelFamily, ResolvedNames, softcap

logger = logging.getLogger(__name__)


class DistributedModelForCausalLM(DistributedPreTrainedModel, GenerationMixin):
    def __init__(self, config: PretrainedConfig, family: ModelFamily, manager: SequenceManager, dht: DHT):
        super().__init__(config, family, manager, dht)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head.requires_grad_(False)
        self.logit_softcap = family.logit_softcap(config)  # Gemma soft-caps its logits

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def head_tensor_names(self, names: ResolvedNames) -> set[str]:
        return {names.lm_head}

    def load_head(self, names: ResolvedNames, tensors: dict[str, torch.Tensor]) -> None:
        if names.lm_head in tensors and not self.config.tie_word_embeddings:
            self.lm_head.weight.data = tensors[names.lm_head]
        else:
            self.lm_head.weight = self.embed_tokens.weight

    def after_load(self, name_or_path: str, *, revision: str | None, token: str | None) -> None:
        try:
            self.generation_config = GenerationConfig.from_pretrained(name_or_path, revision=revision, token=token)
        except OSError:
            self.generation_config = GenerationConfig.from_model_config(self.config)

    # ----- sessions -----

    def inference_session(self, max_length: int) -> InferenceSession:
        """A session whose server-side caches persist across `generate(..., session=...)` calls.

        `max_length` counts tokens; room for a learned prefix (prompt tuning) is added to it.
        """
        prefix = self.prompt_tuning.pre_seq_len if self.prompt_tuning is not None else 0
        return InferenceSession(self.manager, max_length + prefix)

    @contextlib.contextmanager
    def _using(self, session: InferenceSession) -> Iterator[None]:
        previous, self._thread_state.session = self._active_session, session
        try:
            yield
        finally:
            self._thread_state.session = previous

    # ----- forward -----

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        prompts: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = True,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        if input_ids is not None and logits_to_keep > input_ids.shape[1]:
            input_ids = _resend_for_logits(self._active_session, input_ids, logits_to_keep)
        hidden = self.transformer(input_ids, inputs_embeds, attention_mask, prompts)
        logits = softcap(self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden), self.logit_softcap)
        loss = None
        if labels is not None:
            if attention_mask is not None:  # right padding: its positions predict nothing
                labels = labels.masked_fill(~attention_mask.bool(), -100)
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        session = self._active_session
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=(hidden,) if output_hidden_states else None,
            cache=SwarmCache(session) if session is not None else None,
        )

    # ----- generation -----

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, **kwargs: Any) -> dict[str, Any]:
        # The servers hold the cache: send only the tokens they have not seen yet.
        session = self._active_session
        _align_session(session, input_ids)
        return {"input_ids": input_ids[:, session.token_position :], "logits_to_keep": 1}

    @torch.inference_mode()
    def generate(self, inputs: torch.Tensor | None = None, *, session: InferenceSession | None = None, **kwargs: Any):
        """transformers' generate(), run through the swarm.

        With `session=`, the servers keep the conversation: pass the whole conversation as
        input ids each time and only the tokens the servers have not seen are sent.
        """
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids")
        session = session or self._active_session
        if session is None:
            max_length = self._generation_max_length(input_ids, kwargs)
            with self.inference_session(max_length=max_length) as temporary:
                return self.generate(input_ids, session=temporary, **kwargs)
        kwargs.pop("attention_mask", None)
        # The servers always keep a cache. With use_cache, transformers also makes a (never filled)
        # local cache, and beam search then reports its reorders through _reorder_cache.
        kwargs["use_cache"] = True
        with self._using(session):
            return super().generate(input_ids, **kwargs)

    def _generation_max_length(self, input_ids: torch.Tensor, kwargs: dict[str, Any]) -> int:
        config = kwargs.get("generation_config") or self.generation_config
        new_tokens = kwargs.get("max_new_tokens") or config.max_new_tokens
        length = (
            input_ids.shape[1] + new_tokens if new_tokens is not None else kwargs.get("max_length") or config.max_length
        )
        # Prompt lookup may verify its k drafted tokens past the last one kept (transformers drops the excess).
        return length + (kwargs.get("prompt_lookup_num_tokens") or getattr(config, "prompt_lookup_num_tokens", 0) or 0)

    def _reorder_cache(self, cache: Any, beam_idx: torch.Tensor) -> Any:
        """Beam search (transformers calls this after each step): row i continues beam beam_idx[i].

        The servers hold the real cache, so the reorder goes to the session and travels to them
        as the next step's hypo_ids; transformers' own (empty) cache is returned unchanged.
        """
        session = self._active_session
        if session is not None:
            session.reorder(beam_idx)
        return cache


class SwarmCache(Cache):
    """transformers' handle on the servers' caches of a session.

    Assisted generation (`assistant_model=`, `prompt_lookup_num_tokens=`) verifies k drafted tokens in one step,
    then crops the tokens it rejected: the session forgets them, and its next step tells every server to start
    from the position kept (`start_from_position`), in the same round trip as the next verification.
    """

    def __init__(self, session: InferenceSession):
        super().__init__(layers=[])
        self.session = session

    @property
    def is_croppable(self) -> bool:
        return True

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop() takes the negative number of tokens to remove")
        self.session.rewind_tokens(self.session.token_position + tokens_to_remove)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.session.token_position


def _resend_for_logits(session: InferenceSession | None, input_ids: torch.Tensor, logits: int) -> torch.Tensor:
    """Assisted generation wants logits for the positions before its drafted tokens too; when the servers hold
    those positions already (a session reused across generate() calls), they are rolled back and sent again,
    in the same step."""
    missing = logits - input_ids.shape[1]
    if session is None or session.token_ids is None:
        return input_ids
    missing = min(missing, session.token_position, session.token_ids.shape[1])
    if missing <= 0:
        return input_ids
    held = session.token_ids[:, session.token_position - missing : session.token_position]
    session.rewind_tokens(session.token_position - missing)
    return torch.cat([held.to(input_ids.device), input_ids], dim=1)


def _align_session(session: InferenceSession, input_ids: torch.Tensor) -> None:
    """Rewind (and if need be reorder) the session so that it holds the longest prefix of every
    row of input_ids it can, and at least the last token is left to send (its logits are needed).

    Usually the servers hold all but the last token already. On a new generate() call with the
    same session, or after a reorder transformers did not report, the rows it holds are matched
    against input_ids: a row may continue from any held row with the same leading tokens.
    """
    known = session.token_ids
    length = min(input_ids.shape[1] - 1, session.token_position)
    if known is None or known.shape[0] != input_ids.shape[0]:
        session.rewind(0)
        return
    length = min(length, known.shape[1])
    wanted = input_ids[:, :length].cpu()
    if torch.equal(known[:, :length], wanted):  # the usual case: nothing to match
        session.rewind_tokens(length)
        return
    same = known[None, :, :length] == wanted[:, None, :]  # [row wanted, row held, position]
    prefixes = same.cumprod(dim=-1).sum(dim=-1)  # leading tokens they share
    prefix = int(prefixes.max(dim=1).values.min())
    rows = torch.arange(len(wanted))
    keep = prefixes.diagonal() >= prefix
    if not keep.all():
        session.reorder(torch.where(keep, rows, prefixes.argmax(dim=1)))
    session.rewind_tokens(prefix)


class AutoDistributedModelForCausalLM:
    """Entry point, named like transformers' Auto classes."""

    @staticmethod
    def from_pretrained(name_or_path: str, **kwargs: Any) -> DistributedModelForCausalLM:
        """See `swarm.client.distributed.load_distributed_model` for the keywords."""
        return load_distributed_model(DistributedModelForCausalLM, name_or_path, **kwargs)
