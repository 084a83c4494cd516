"""The chat models this site offers: `settings.PLAYGROUND_MODELS`, parsed and validated once.

Each entry maps a model name (what clients send as `model`) to:

    {
      "path": "owner/repo or /local/folder",         # required
      "display_name": "Llama 3.1 70B Instruct",
      "dht_prefix": null,                              # default: derived from the path, as Petals does
      "initial_peers": [...],                          # default: SWARM_INITIAL_PEERS
      "chat_template": null,                           # Jinja text; default: the tokenizer's
      "separators": null,                              # or {"prefix", "user_start", "user_end",
                                                       #     "assistant_start", "assistant_end"}
      "defaults": {"do_sample": true, "temperature": 0.7, "top_k": 50, "top_p": 0.9,
                   "repetition_penalty": 1.1, "max_new_tokens": 256},
      "max_length": 2048,                              # session length cap for this model (tokens)
      "client": {"request_timeout": 30},               # swarm.client.config.ClientConfig overrides
      "adapter": null,                                 # a LoRA adapter the swarm serves (its announced name)
      "draft": null                                    # a small local model with the same tokenizer: replies
                                                       # are drafted by it and verified by the swarm several
                                                       # tokens per round trip (speculative decoding)
    }
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed

from playground.errors import UnknownModel
from swarm.client.config import ClientConfig

MODEL_NAME_MAX_CHARS = 128
SEPARATOR_KEYS = ("prefix", "user_start", "user_end", "assistant_start", "assistant_end")
_CLIENT_FIELDS = {f.name for f in dataclasses.fields(ClientConfig)} - {"initial_peers", "dht_prefix", "active_adapter"}


@dataclasses.dataclass(frozen=True)
class SamplingDefaults:
    """What the chat page starts with and what the OpenAI endpoint uses for omitted parameters."""

    do_sample: bool = True
    temperature: float = 0.7
    top_k: int = 50
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    max_new_tokens: int = 256

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ChatModelSpec:
    name: str
    path: str
    display_name: str
    dht_prefix: str | None = None
    initial_peers: tuple[str, ...] | None = None
    chat_template: str | None = None
    separators: dict[str, str] | None = None
    defaults: SamplingDefaults = SamplingDefaults()
    max_length: int = 2048
    client: dict[str, Any] = dataclasses.field(default_factory=dict)
    adapter: str | None = None  # the client's active_adapter: only servers announcing it are used
    draft: str | None = None  # path of a local draft model for speculative decoding

    @property
    def peers(self) -> list[str]:
        return list(self.initial_peers if self.initial_peers is not None else settings.SWARM_INITIAL_PEERS)

    @property
    def session_cap(self) -> int:
        """The largest max_length a client may open a session with."""
        return min(self.max_length, settings.PLAYGROUND_MAX_LENGTH)


def parse_models(raw: Any) -> dict[str, ChatModelSpec]:
    """Validate the PLAYGROUND_MODELS setting; raises ImproperlyConfigured with the reason."""
    if not isinstance(raw, dict) or not raw:
        raise ImproperlyConfigured("PLAYGROUND_MODELS must be a non-empty JSON object: {name: {path: ...}}")
    specs = {}
    for name, entry in raw.items():
        if not isinstance(name, str) or not 0 < len(name) <= MODEL_NAME_MAX_CHARS:
            raise ImproperlyConfigured(f"PLAYGROUND_MODELS: bad model name {name!r}")
        try:
            specs[name] = _parse_entry(name, entry)
        except (TypeError, ValueError) as e:
            raise ImproperlyConfigured(f"PLAYGROUND_MODELS[{name!r}]: {e}") from e
    return specs


def _parse_entry(name: str, entry: Any) -> ChatModelSpec:
    if isinstance(entry, str):
        entry = {"path": entry}
    if not isinstance(entry, dict):
        raise TypeError("must be an object with at least a 'path'")
    unknown = set(entry) - ({f.name for f in dataclasses.fields(ChatModelSpec)} - {"name"})
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}")
    path = entry.get("path")
    if not isinstance(path, str) or not path:
        raise ValueError("'path' must be a repository name or a local folder")
    separators = entry.get("separators")
    if separators is not None and (
        not isinstance(separators, dict)
        or set(separators) - set(SEPARATOR_KEYS)
        or not all(isinstance(v, str) for v in separators.values())
    ):
        raise ValueError(f"'separators' must map some of {SEPARATOR_KEYS} to strings")
    client = entry.get("client") or {}
    if not isinstance(client, dict) or set(client) - _CLIENT_FIELDS:
        raise ValueError(f"'client' may only set {sorted(_CLIENT_FIELDS)}")
    peers = entry.get("initial_peers")
    if peers is not None and (not isinstance(peers, list) or not all(isinstance(p, str) for p in peers)):
        raise ValueError("'initial_peers' must be a list of multiaddrs")
    max_length = entry.get("max_length", 2048)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError("'max_length' must be a positive integer")
    for key in ("display_name", "dht_prefix", "chat_template", "adapter", "draft"):
        if entry.get(key) is not None and not isinstance(entry[key], str):
            raise ValueError(f"'{key}' must be a string")
    return ChatModelSpec(
        name=name,
        path=path,
        display_name=entry.get("display_name") or name,
        dht_prefix=entry.get("dht_prefix"),
        initial_peers=tuple(peers) if peers is not None else None,
        chat_template=entry.get("chat_template"),
        separators={**dict.fromkeys(SEPARATOR_KEYS, ""), **separators} if separators else None,
        defaults=_parse_defaults(entry.get("defaults") or {}),
        max_length=max_length,
        client=dict(client),
        adapter=entry.get("adapter") or None,
        draft=entry.get("draft") or None,
    )


def _parse_defaults(raw: Any) -> SamplingDefaults:
    if not isinstance(raw, dict):
        raise TypeError("'defaults' must be an object")
    fields = {f.name: f.type for f in dataclasses.fields(SamplingDefaults)}
    unknown = set(raw) - set(fields)
    if unknown:
        raise ValueError(f"unknown sampling defaults {sorted(unknown)}")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "do_sample":
            if not isinstance(value, bool):
                raise ValueError("defaults.do_sample must be true or false")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"defaults.{key} must be a non-negative number")
        values[key] = int(value) if key in ("top_k", "max_new_tokens") else value
    return SamplingDefaults(**values)


@functools.cache
def configured_models() -> dict[str, ChatModelSpec]:
    return parse_models(settings.PLAYGROUND_MODELS)


def get_spec(name: str) -> ChatModelSpec | None:
    return configured_models().get(name)


def model_spec(name: Any) -> ChatModelSpec:
    """The spec of a model a client asked for by name; UnknownModel (listing the served ones) if none."""
    models = configured_models()
    if not isinstance(name, str) or name not in models:
        shown = repr(name[:100]) if isinstance(name, str) else "that model"
        raise UnknownModel(f"unknown model {shown}; this site serves: {', '.join(models)}")
    return models[name]


def _reset(setting: str, **kwargs: Any) -> None:
    if setting.startswith("PLAYGROUND_") or setting == "SWARM_INITIAL_PEERS":
        configured_models.cache_clear()


setting_changed.connect(_reset)
