"""The embedded swarm clients of this ASGI process: one distributed model per configured chat model.

Models load lazily, on first use, and are then shared by every socket and request: the engine
keeps the active inference session per thread, so one model serves many conversations at once.
Tokenizers and chat formats load separately (cheap) because the chat page needs them before any
model is used. Loading blocks, so async callers go through `aload()`, which runs it off the loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import Sequence
from typing import Any

from django.conf import settings

from playground.catalog import ChatModelSpec, model_spec
from playground.errors import SwarmUnavailable
from playground.prompting import ChatFormat, default_format, format_from_separators, format_from_template
from playground.workers import executor

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ChatModel:
    spec: ChatModelSpec
    model: Any  # swarm.client.model.DistributedModelForCausalLM
    tokenizer: Any
    chat_format: ChatFormat
    draft: Any = None  # a local draft model (speculative decoding), or None

    @property
    def eos_token_ids(self) -> frozenset[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return frozenset([eos] if isinstance(eos, int) else (eos or []))


@dataclasses.dataclass(frozen=True)
class SwarmIdentity:
    """Where a model's blocks live in the DHT."""

    dht_prefix: str
    num_blocks: int


class ModelRegistry:
    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards the dicts; loading itself holds a per-model lock
        self._model_locks: dict[str, threading.Lock] = {}
        self._models: dict[str, ChatModel] = {}
        self._tokenizers: dict[str, Any] = {}
        self._formats: dict[str, ChatFormat] = {}
        self._identities: dict[str, SwarmIdentity] = {}
        self._dhts: dict[tuple[str, ...], Any] = {}
        self._dht_lock = threading.Lock()  # starting a DHT takes seconds: not under the main lock

    # ----- specs -----

    spec = staticmethod(model_spec)

    # ----- light parts: tokenizer, chat format, DHT identity -----

    def tokenizer(self, name: str) -> Any:
        with self._lock:
            if name in self._tokenizers:
                return self._tokenizers[name]
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.spec(name).path)
        with self._lock:
            return self._tokenizers.setdefault(name, tokenizer)

    def chat_format(self, name: str) -> ChatFormat:
        with self._lock:
            if name in self._formats:
                return self._formats[name]
        spec = self.spec(name)
        if spec.separators:
            chat = format_from_separators(spec.separators)
        else:
            tokenizer = self.tokenizer(name)
            chat = None
            if spec.chat_template or getattr(tokenizer, "chat_template", None):
                chat = format_from_template(tokenizer, spec.chat_template)
            chat = chat or default_format(tokenizer)
        with self._lock:
            return self._formats.setdefault(name, chat)

    def identity(self, name: str) -> SwarmIdentity:
        with self._lock:
            if name in self._identities:
                return self._identities[name]
            if name in self._models:
                manager = self._models[name].model.manager
                return self._identities.setdefault(name, SwarmIdentity(manager.dht_prefix, manager.num_blocks))
        from transformers import AutoConfig

        from swarm.models.registry import dht_prefix_for, family_for

        spec = self.spec(name)
        config = AutoConfig.from_pretrained(spec.path)
        prefix = spec.dht_prefix or dht_prefix_for(spec.path, config.model_type)
        identity = SwarmIdentity(prefix, family_for(config).num_blocks(config))
        with self._lock:
            return self._identities.setdefault(name, identity)

    def dht(self, initial_peers: Sequence[str]) -> Any:
        """One client-mode DHT per swarm, shared by the models and the availability checks."""
        key = tuple(initial_peers)
        with self._dht_lock:
            if key not in self._dhts:
                from swarm.client.config import ClientConfig
                from swarm.dht import RelaySettings, create_dht

                # Client mode, like the engine's own: this process only asks, it never stores records.
                relay = RelaySettings(use_relay=getattr(settings, "SWARM_USE_RELAY", True))
                self._dhts[key] = create_dht(key, client_mode=True, host_maddrs=ClientConfig().host_maddrs, relay=relay)
            return self._dhts[key]

    # ----- the distributed model -----

    def loaded(self, name: str) -> ChatModel | None:
        return self._models.get(name)

    def load(self, name: str) -> ChatModel:
        """The model, loading it on first use (blocking: call from a worker thread)."""
        spec = self.spec(name)
        with self._lock:
            if name in self._models:
                return self._models[name]
            lock = self._model_locks.setdefault(name, threading.Lock())
        with lock:
            if name in self._models:  # loaded while we waited
                return self._models[name]
            chat = self._load(spec)
            with self._lock:
                self._models[name] = chat
            return chat

    async def aload(self, name: str) -> ChatModel:
        self.spec(name)  # unknown names fail fast, without a thread hop
        chat = self._models.get(name)
        if chat is not None:
            return chat
        return await asyncio.get_running_loop().run_in_executor(executor(), self.load, name)

    def _load(self, spec: ChatModelSpec) -> ChatModel:
        from swarm import AutoDistributedModelForCausalLM

        overrides = {
            "request_timeout": settings.SWARM_REQUEST_TIMEOUT,
            "missing_blocks_timeout": settings.PLAYGROUND_MISSING_BLOCKS_TIMEOUT,
            **spec.client,
            "active_adapter": spec.adapter,
        }
        logger.info("Loading chat model %s (%s) from %d initial peers", spec.name, spec.path, len(spec.peers))
        try:
            model = AutoDistributedModelForCausalLM.from_pretrained(
                spec.path, initial_peers=spec.peers, dht_prefix=spec.dht_prefix, dht=self.dht(spec.peers), **overrides
            )
        except Exception as e:
            logger.exception("Could not load chat model %s", spec.name)
            raise SwarmUnavailable(f"model {spec.name!r} could not be loaded right now; try again later") from e
        return ChatModel(
            spec=spec,
            model=model,
            tokenizer=self.tokenizer(spec.name),
            chat_format=self.chat_format(spec.name),
            draft=_load_draft(spec),
        )

    def shutdown(self) -> None:
        """Stop the clients and their DHTs (tests, process exit); models loaded so far become unusable."""
        with self._dht_lock, self._lock:
            dhts, self._dhts = list(self._dhts.values()), {}
            models, self._models = list(self._models.values()), {}
            self._identities.clear()
        for chat in models:
            try:
                chat.model.close()
            except Exception:
                logger.warning("Stopping the client of %s failed", chat.spec.name, exc_info=True)
        for dht in dhts:
            dht.shutdown()


def _load_draft(spec: ChatModelSpec) -> Any:
    """The model's draft for speculative decoding; without one (or if it cannot load) replies are not drafted."""
    if not spec.draft:
        return None
    import torch
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(spec.draft, dtype=torch.float32).eval()
    except Exception:
        logger.warning("Could not load the draft model %s of %s: replies go token by token", spec.draft, spec.name)
        return None


registry = ModelRegistry()
