"""What every distributed model shares: the client's few weights, the remote blocks, prompt tuning,
saving and loading what trained, and `from_pretrained`.

A client holds the embeddings, the final norm and its head; the transformer blocks run on the
swarm. With `tuning_mode` ("ptune", "deep_ptune") the model gets trainable prompts; a head such as
the classifier's score is trainable too. `save_pretrained` writes only those trainable weights
plus a config naming the base model, so `from_pretrained(saved_dir, initial_peers=...)` restores
them on top of the base model's weights, and `transformers.Trainer` saves and resumes as usual.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import safetensors.torch
import torch
from hivemind import DHT
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.utils import SAFE_WEIGHTS_NAME

from swarm.checkpoint import CheckpointFiles
from swarm.client.config import ClientConfig
from swarm.client.event_loop import run_sync
from swarm.client.inference_session import InferenceSession
from swarm.client.ptune import PromptTuning, check_tuning_options
from swarm.client.remote_sequential import remote_sequential
from swarm.client.routing import SequenceManager
from swarm.dht import RelaySettings, create_dht
from swarm.models.family import ModelFamily, ResolvedNames
from swarm.models.registry import dht_prefix_for, family_for, prepare_config

logger = logging.getLogger(__name__)
M = TypeVar("M", bound="DistributedPreTrainedModel")

# from_pretrained's own keywords (the rest are ClientConfig fields or the model class's config keywords)
LOAD_KEYWORDS = ("initial_peers", "dht_prefix", "dtype", "torch_dtype", "revision", "token", "dht")


class DistributedPreTrainedModel(PreTrainedModel):
    config_class = PretrainedConfig
    main_input_name = "input_ids"
    _supports_sdpa = True  # attention runs on the servers; this only satisfies transformers' checks
    # Keywords of from_pretrained that set model config attributes, as in Petals.
    config_keywords: tuple[str, ...] = ("tuning_mode", "pre_seq_len")

    def __init__(self, config: PretrainedConfig, family: ModelFamily, manager: SequenceManager, dht: DHT):
        super().__init__(config)
        self.family = family
        # The client's pieces, as the family's own model builds them (Gemma scales its embeddings,
        # BLOOM normalises them).
        self.embed_tokens = family.make_embeddings(config)
        self.embedding_norm = family.make_embedding_norm(config) if family.make_embedding_norm else None
        self.norm = family.make_norm(config)
        self.manager = manager
        self.dht = dht
        self.owns_dht = False  # from_pretrained sets it when it started the DHT peer itself
        # Per thread: one shared model may generate for several conversations at once.
        self._thread_state = threading.local()
        self.requires_grad_(False)  # the base model's weights are frozen, here as on the servers
        tuning_mode = getattr(config, "tuning_mode", None)
        pre_seq_len = getattr(config, "pre_seq_len", None)
        check_tuning_options(tuning_mode, pre_seq_len)
        self.prompt_tuning = None
        if tuning_mode is not None:
            init_std = getattr(config, "initializer_range", 0.02)
            num_blocks = family.num_blocks(config)
            self.prompt_tuning = PromptTuning(tuning_mode, pre_seq_len, config.hidden_size, num_blocks, init_std)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def float32_modules(self) -> list[nn.Module]:
        """Trainable parts, kept in float32 whatever the model's dtype."""
        return [self.prompt_tuning] if self.prompt_tuning is not None else []

    # ----- weights -----

    def load_local_weights(self, files: CheckpointFiles, dtype: torch.dtype) -> None:
        """Embeddings, norms and (by subclasses) the head: the only base weights a client holds."""
        names = self.family.checkpoint.resolve(files.tensor_names())
        norms = {"norm": names.final_norm}
        if self.embedding_norm is not None:
            norms["embedding_norm"] = names.embedding_norm
        wanted = {names.embeddings, *self.head_tensor_names(names)}
        tensors = files.load(lambda n: n in wanted or n.startswith(tuple(norms.values())), dtype=dtype)
        self.embed_tokens.weight.data = tensors[names.embeddings]
        for attribute, prefix in norms.items():
            weights = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            getattr(self, attribute).load_state_dict(weights)
        self.load_head(names, tensors)

    def head_tensor_names(self, names: ResolvedNames) -> set[str]:
        return set()

    def load_head(self, names: ResolvedNames, tensors: dict[str, torch.Tensor]) -> None:
        """Subclasses with a head read it from the checkpoint's tensors here."""

    def after_load(self, name_or_path: str, *, revision: str | None, token: str | None) -> None:
        """Subclasses read what else they need from the base model (a generation config, ...)."""

    def trainable_state_dict(self, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        trainable = {name for name, parameter in self.named_parameters() if parameter.requires_grad}
        state_dict = self.state_dict() if state_dict is None else state_dict
        return {name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items() if name in trainable}

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        state_dict: dict[str, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        """Write only the trainable weights (prompts, heads) and a config naming the base model.

        Trainer calls this for every checkpoint; `from_pretrained(save_directory, initial_peers=...)`
        loads the base model and puts these weights back.
        """
        if not is_main_process:
            return
        tensors = self.trainable_state_dict(state_dict)
        if not tensors:
            raise ValueError(self._nothing_trains_message())
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = copy.deepcopy(self.config)
        config.architectures = [type(self).__name__]
        config.save_pretrained(directory)
        safetensors.torch.save_file(tensors, directory / SAFE_WEIGHTS_NAME, metadata={"format": "pt"})
        logger.info("Saved %d trainable tensors to %s", len(tensors), directory)

    def load_tuned_weights(self, directory: str | os.PathLike) -> None:
        """Put back what `save_pretrained` wrote (from_pretrained of a saved directory does this)."""
        path = Path(directory) / SAFE_WEIGHTS_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{directory} holds no {SAFE_WEIGHTS_NAME} of tuned weights")
        tensors = safetensors.torch.load_file(path)
        own = self.state_dict()
        unknown = sorted(set(tensors) - set(own))
        if unknown:
            raise ValueError(f"{path} has weights this model does not have: {', '.join(unknown[:5])}")
        for name, tensor in tensors.items():
            if tensor.shape != own[name].shape:
                raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, expected {tuple(own[name].shape)}")
        self.load_state_dict(tensors)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """As torch's, except that the frozen base weights may be absent: they come from the base model,
        and checkpoints of this model (Trainer's too) hold only what trains."""
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        trainable = {name for name, parameter in self.named_parameters() if parameter.requires_grad}
        missing = [name for name in result.missing_keys if name in trainable]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"error loading the state dict of {type(self).__name__}: missing {missing}, "
                f"unexpected {result.unexpected_keys}"
            )
        return _IncompatibleKeys(missing, result.unexpected_keys)

    # ----- training -----

    @property
    def accepts_loss_kwargs(self) -> bool:
        # transformers' Trainer reads this when it takes the model: the earliest moment to say,
        # before an optimizer fails on an empty parameter list, that nothing here would train.
        if not any(parameter.requires_grad for parameter in self.parameters()):
            raise ValueError(self._nothing_trains_message())
        return False

    def _nothing_trains_message(self) -> str:
        return (
            f"{type(self).__name__} has no trainable parameters: the servers' blocks are frozen. Pass "
            "tuning_mode='ptune' (or 'deep_ptune') and pre_seq_len=N to from_pretrained to train prompts, "
            "or add trainable modules of your own."
        )

    # ----- the remote blocks -----

    def close(self) -> None:
        """Leave the swarm: stop this client's P2P connection, and its DHT peer unless it was given one."""
        try:
            run_sync(self.manager.p2p.shutdown(), timeout=10)
        except Exception as e:  # already gone
            logger.debug("P2P shutdown: %s", e)
        if self.owns_dht:
            self.dht.shutdown()

    @property
    def _active_session(self) -> InferenceSession | None:
        return getattr(self._thread_state, "session", None)

    def transformer(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states of the input's tokens (learned prefix positions removed).

        `prompts`: explicit deep prompts, (blocks, batch, prefix, hidden), for callers that manage
        their own; with `tuning_mode` the model's own prompts are used.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        _check_right_padded(attention_mask)
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        session = self._active_session
        prefix_length = 0
        if self.prompt_tuning is not None and (session is None or session.position == 0):
            prefix, deep_prompts = self.prompt_tuning(hidden.shape[0])
            hidden = torch.cat([prefix.to(hidden.dtype), hidden], dim=1)
            prompts = deep_prompts if deep_prompts is not None else prompts
            prefix_length = prefix.shape[1]
        if self.embedding_norm is not None:
            hidden = self.embedding_norm(hidden)
        if session is not None:
            step = session.step(hidden, token_ids=input_ids, prompts=prompts, prefix_length=prefix_length)
            hidden = step.to(hidden.dtype)
        else:
            hidden = remote_sequential(self.manager, hidden, prompts)
        return self.norm(hidden[:, prefix_length:])


def _check_right_padded(attention_mask: torch.Tensor | None) -> None:
    """Causal blocks let a token see only earlier ones, so padding after a sequence changes nothing
    before it; padding in front would be attended to."""
    if attention_mask is None:
        return
    mask = attention_mask.bool()
    if not bool((mask.cummin(dim=1).values == mask).all()) or not bool(mask[:, 0].all()):
        raise ValueError(
            "only right padding is supported: the swarm's servers attend to every earlier token of a sequence "
            "(set tokenizer.padding_side = 'right')"
        )


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """None or "auto": float32 (the client's few weights; the servers choose their own dtype)."""
    if dtype is None or dtype == "auto":
        return torch.float32
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
            raise ValueError(f"dtype must be a floating-point torch dtype, got {dtype!r}")
        return resolved
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch dtype, got {dtype!r}")
    return dtype


def load_distributed_model(
    cls: type[M],
    name_or_path: str,
    *,
    initial_peers: Sequence[str],
    dht_prefix: str | None = None,
    dtype: torch.dtype | str | None = None,
    torch_dtype: torch.dtype | str | None = None,  # Petals scripts' (and transformers 4's) name for dtype
    revision: str | None = None,
    token: str | None = None,
    dht: DHT | None = None,
    **keywords: Any,
) -> M:
    """`from_pretrained` of every distributed model.

    `name_or_path` is a model (Hub id or folder) or a folder that `save_pretrained` wrote after
    tuning (its config names the base model). Other keywords set `ClientConfig` fields (e.g.
    `request_timeout=10`) or the class's config keywords (`tuning_mode`, `pre_seq_len`, ...).
    """
    client_fields = {field.name for field in dataclasses.fields(ClientConfig)}
    unknown = set(keywords) - client_fields - set(cls.config_keywords)
    if unknown:
        accepted = [*LOAD_KEYWORDS, *cls.config_keywords, *sorted(client_fields - set(LOAD_KEYWORDS))]
        raise TypeError(f"unexpected keyword argument(s) {', '.join(sorted(unknown))}; accepted: {', '.join(accepted)}")
    client_overrides = {k: v for k, v in keywords.items() if k in client_fields}
    config_overrides = {k: v for k, v in keywords.items() if k in cls.config_keywords and v is not None}
    if dtype is not None and torch_dtype is not None and resolve_dtype(dtype) != resolve_dtype(torch_dtype):
        raise ValueError(
            f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree: give one (torch_dtype is its old name)"
        )
    resolved_dtype = resolve_dtype(dtype if dtype is not None else torch_dtype)
    client_config = dataclasses.replace(ClientConfig(initial_peers=tuple(initial_peers)), **client_overrides)

    config = AutoConfig.from_pretrained(name_or_path, revision=revision, token=token)
    tuned_directory = None
    base = getattr(config, "base_model_name_or_path", None)
    if base:  # a folder of tuned weights: the base model's weights come from where it names
        tuned_directory, name_or_path, revision = name_or_path, base, getattr(config, "base_model_revision", None)
    config = prepare_config(config)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    check_tuning_options(getattr(config, "tuning_mode", None), getattr(config, "pre_seq_len", None))
    config.base_model_name_or_path = name_or_path
    config.base_model_revision = revision
    family = family_for(config)
    prefix = dht_prefix or client_config.dht_prefix or dht_prefix_for(name_or_path, config.model_type)

    owns_dht = dht is None
    if dht is None:
        dht = create_dht(
            client_config.initial_peers,
            client_mode=True,
            host_maddrs=client_config.host_maddrs,
            relay=RelaySettings(use_relay=client_config.use_relay),
        )
    try:
        p2p = run_sync(dht.replicate_p2p(), timeout=60)
        manager = SequenceManager(dht, p2p, prefix, family.num_blocks(config), client_config, name_or_path)
        model = cls(config, family, manager, dht)
        model.owns_dht = owns_dht
        model.load_local_weights(CheckpointFiles(name_or_path, revision=revision, token=token), resolved_dtype)
        model.to(resolved_dtype)
        for module in model.float32_modules():
            module.float()
        if tuned_directory is not None:
            model.load_tuned_weights(tuned_directory)
        model.after_load(name_or_path, revision=revision, token=token)
    except BaseException:
        if owns_dht:
            dht.shutdown()
        raise
    return model.eval()
