"""The distributed causal LM: embeddings and LM head here, transformer blocks on the swarm.

`AutoDistributedModelForCausalLM.from_pretrained(name_or_path, initial_peers=[...])` loads only
the config, embeddings, final norm and LM head, and returns a real transformers
`GenerationMixin` model: `generate()` works with its usual arguments (greedy, sampling,
top-k/top-p, temperature, repetition penalty, stop strings, streamers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from hivemind import DHT
from torch import nn
from transformers import AutoConfig, GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from swarm.checkpoint import CheckpointFiles
from swarm.client.config import ClientConfig
from swarm.client.event_loop import run_sync
from swarm.client.inference_session import InferenceSession
from swarm.client.remote_sequential import remote_sequential
from swarm.client.routing import SequenceManager
from swarm.dht import create_dht
from swarm.models.family import ModelFamily, softcap
from swarm.models.registry import dht_prefix_for, family_for, prepare_config

logger = logging.getLogger(__name__)


class DistributedModelForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = PretrainedConfig
    main_input_name = "input_ids"
    _supports_sdpa = True  # attention runs on the servers; this only satisfies transformers' checks

    def __init__(self, config: PretrainedConfig, family: ModelFamily, manager: SequenceManager, dht: DHT):
        super().__init__(config)
        self.family = family
        # The client's pieces, as the family's own model builds them (Gemma scales its embeddings,
        # BLOOM normalises them, Gemma soft-caps its logits).
        self.embed_tokens = family.make_embeddings(config)
        self.embedding_norm = family.make_embedding_norm(config) if family.make_embedding_norm else None
        self.norm = family.make_norm(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.logit_softcap = family.logit_softcap(config)
        self.manager = manager
        self.dht = dht
        self.owns_dht = False  # from_pretrained sets it when it started the DHT peer itself
        # Per thread: one shared model may generate for several conversations at once.
        self._thread_state = threading.local()
        self.requires_grad_(False)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def load_local_weights(self, files: CheckpointFiles, dtype: torch.dtype) -> None:
        """Embeddings, final norm and LM head: the only weights a client holds."""
        names = self.family.checkpoint.resolve(files.tensor_names())
        norms = {"norm": names.final_norm}
        if self.embedding_norm is not None:
            norms["embedding_norm"] = names.embedding_norm
        wanted = {names.embeddings, names.lm_head}
        tensors = files.load(lambda n: n in wanted or n.startswith(tuple(norms.values())), dtype=dtype)
        self.embed_tokens.weight.data = tensors[names.embeddings]
        for attribute, prefix in norms.items():
            weights = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            getattr(self, attribute).load_state_dict(weights)
        if names.lm_head in tensors and not self.config.tie_word_embeddings:
            self.lm_head.weight.data = tensors[names.lm_head]
        else:
            self.lm_head.weight = self.embed_tokens.weight

    def close(self) -> None:
        """Leave the swarm: stop this client's P2P connection, and its DHT peer unless it was given one."""
        try:
            run_sync(self.manager.p2p.shutdown(), timeout=10)
        except Exception as e:  # already gone
            logger.debug("P2P shutdown: %s", e)
        if self.owns_dht:
            self.dht.shutdown()

    # ----- sessions -----

    def inference_session(self, max_length: int) -> InferenceSession:
        """A session whose server-side caches persist across `generate(..., session=...)` calls."""
        return InferenceSession(self.manager, max_length)

    @contextlib.contextmanager
    def _using(self, session: InferenceSession) -> Iterator[None]:
        previous, self._thread_state.session = self._active_session, session
        try:
            yield
        finally:
            self._thread_state.session = previous

    @property
    def _active_session(self) -> InferenceSession | None:
        return getattr(self._thread_state, "session", None)

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
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("padding is not supported: the swarm's servers attend to every token of a sequence")
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if self.embedding_norm is not None:
            hidden = self.embedding_norm(hidden)
        if self._active_session is not None:
            hidden = self._active_session.step(hidden, token_ids=input_ids).to(hidden.dtype)
        else:
            hidden = remote_sequential(self.manager, hidden, prompts)
        hidden = self.norm(hidden)
        logits = softcap(self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden), self.logit_softcap)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=(hidden,) if output_hidden_states else None
        )

    # ----- generation -----

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, **kwargs: Any) -> dict[str, Any]:
        # The servers hold the cache: send only the tokens they have not seen yet.
        session = self._active_session
        return {"input_ids": input_ids[:, session.position :], "logits_to_keep": 1}

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
        session.rewind(_common_prefix(session.token_ids, input_ids, session.position))
        if session.position == input_ids.shape[1]:
            session.rewind(session.position - 1)  # the last token's logits are needed again
        kwargs.pop("attention_mask", None)
        with self._using(session):
            return super().generate(input_ids, **kwargs)

    def _generation_max_length(self, input_ids: torch.Tensor, kwargs: dict[str, Any]) -> int:
        config = kwargs.get("generation_config") or self.generation_config
        new_tokens = kwargs.get("max_new_tokens") or config.max_new_tokens
        if new_tokens is not None:
            return input_ids.shape[1] + new_tokens
        return kwargs.get("max_length") or config.max_length

    def _reorder_cache(self, past_key_values, beam_idx):  # noqa: D401
        raise NotImplementedError("beam search is not supported by the distributed model yet")


def _common_prefix(known: torch.Tensor | None, input_ids: torch.Tensor, position: int) -> int:
    """How many leading tokens of input_ids the servers already hold."""
    if known is None or known.shape[0] != input_ids.shape[0]:
        return 0
    length = min(known.shape[1], input_ids.shape[1], position)
    same = (known[:, :length] == input_ids[:, :length].cpu()).all(dim=0)
    mismatch = (~same).nonzero()
    return int(mismatch[0]) if len(mismatch) else length


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """None or "auto": float32 (the client's few weights; the servers choose their own dtype)."""
    if dtype is None or dtype == "auto":
        return torch.float32
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
            raise ValueError(f"dtype must be a floating-point torch dtype, got {dtype!r}")
        return resolved
    return dtype


class AutoDistributedModelForCausalLM:
    """Entry point, named like transformers' Auto classes."""

    @staticmethod
    def from_pretrained(
        name_or_path: str,
        *,
        initial_peers: Sequence[str],
        dht_prefix: str | None = None,
        dtype: torch.dtype | str | None = None,
        torch_dtype: torch.dtype | str | None = None,  # Petals scripts' (and transformers 4's) name for dtype
        revision: str | None = None,
        token: str | None = None,
        dht: DHT | None = None,
        **config_overrides: Any,
    ) -> DistributedModelForCausalLM:
        """`config_overrides` set `ClientConfig` fields (e.g. `request_timeout=10`)."""
        unknown = set(config_overrides) - {field.name for field in dataclasses.fields(ClientConfig)}
        if unknown:
            accepted = ["initial_peers", "dht_prefix", "dtype", "torch_dtype", "revision", "token", "dht"]
            accepted += sorted({field.name for field in dataclasses.fields(ClientConfig)} - set(accepted))
            raise TypeError(
                f"unexpected keyword argument(s) {', '.join(sorted(unknown))}; accepted: {', '.join(accepted)}"
            )
        torch_dtype = _resolve_dtype(dtype if dtype is not None else torch_dtype)
        client_config = dataclasses.replace(ClientConfig(initial_peers=tuple(initial_peers)), **config_overrides)
        config = prepare_config(AutoConfig.from_pretrained(name_or_path, revision=revision, token=token))
        family = family_for(config)
        prefix = dht_prefix or client_config.dht_prefix or dht_prefix_for(name_or_path, config.model_type)
        owns_dht = dht is None
        if dht is None:
            dht = create_dht(client_config.initial_peers, client_mode=True, host_maddrs=client_config.host_maddrs)
        p2p = run_sync(dht.replicate_p2p(), timeout=60)
        manager = SequenceManager(dht, p2p, prefix, family.num_blocks(config), client_config, name_or_path)
        model = DistributedModelForCausalLM(config, family, manager, dht)
        model.owns_dht = owns_dht
        model.load_local_weights(CheckpointFiles(name_or_path, revision=revision, token=token), torch_dtype)
        try:
            model.generation_config = GenerationConfig.from_pretrained(name_or_path, revision=revision, token=token)
        except OSError:
            model.generation_config = GenerationConfig.from_model_config(config)
        return model.to(torch_dtype).eval()
