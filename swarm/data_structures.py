"""What servers announce in the DHT, and its strict parsing (PROTOCOL.md, "Block announcements").

Every value read from the DHT comes from a stranger: `ServerInfo.from_tuple` accepts only the
documented shape, with bounded sizes and finite non-negative numbers, and raises ValueError
for anything else so that readers can skip the entry.
"""

from __future__ import annotations

import dataclasses
import math
from enum import IntEnum
from typing import Any

MAX_STRING_LENGTH = 256
MAX_ADAPTERS = 64
MAX_NEXT_PINGS = 256
MAX_NUM_BLOCKS = 100_000
QUANT_TYPES = ("none", "int8", "nf4")


class ServerState(IntEnum):
    OFFLINE = 0
    JOINING = 1
    ONLINE = 2


def _string(value: Any, field: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_STRING_LENGTH:
        raise ValueError(f"{field} must be a string of at most {MAX_STRING_LENGTH} characters")
    return value


def _rate(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field} must be a number")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{field} must be finite and non-negative")
    return value


def _block_index(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_NUM_BLOCKS:
        raise ValueError(f"{field} must be an integer in [0, {MAX_NUM_BLOCKS}]")
    return value


@dataclasses.dataclass(frozen=True)
class ServerInfo:
    state: ServerState
    throughput: float
    start_block: int | None = None
    end_block: int | None = None
    public_name: str | None = None
    version: str | None = None
    network_rps: float | None = None
    forward_rps: float | None = None
    inference_rps: float | None = None
    adapters: tuple[str, ...] = ()
    torch_dtype: str | None = None
    quant_type: str | None = None
    using_relay: bool | None = None
    cache_tokens_left: int | None = None
    next_pings: dict[str, float] | None = None

    def to_tuple(self) -> tuple[int, float, dict[str, Any]]:
        """The DHT value: `(state, throughput, extra)`, extra holding only the fields that are set."""
        extra: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            if field.name in ("state", "throughput"):
                continue
            value = getattr(self, field.name)
            if value is None or (field.name == "adapters" and not value):
                continue
            extra[field.name] = list(value) if field.name == "adapters" else value
        return (int(self.state), float(self.throughput), extra)

    @classmethod
    def from_tuple(cls, value: Any) -> ServerInfo:
        """Parse an untrusted DHT value; raises ValueError when it is not a valid announcement."""
        if not isinstance(value, (tuple, list)) or len(value) < 2:
            raise ValueError("announcement must be a (state, throughput, extra) tuple")
        state_value, throughput = value[0], value[1]
        extra = value[2] if len(value) > 2 else {}
        if isinstance(state_value, bool) or state_value not in (0, 1, 2):
            raise ValueError("state must be 0, 1 or 2")
        if not isinstance(extra, dict):
            raise ValueError("extra must be a dict")
        kwargs: dict[str, Any] = {}
        for key in ("start_block", "end_block"):
            if extra.get(key) is not None:
                kwargs[key] = _block_index(extra[key], key)
        for key in ("public_name", "version", "torch_dtype"):
            if extra.get(key) is not None:
                kwargs[key] = _string(extra[key], key)
        for key in ("network_rps", "forward_rps", "inference_rps"):
            if extra.get(key) is not None:
                kwargs[key] = _rate(extra[key], key)
        if extra.get("quant_type") is not None:
            if extra["quant_type"] not in QUANT_TYPES:
                raise ValueError(f"quant_type must be one of {QUANT_TYPES}")
            kwargs["quant_type"] = extra["quant_type"]
        if extra.get("using_relay") is not None:
            if not isinstance(extra["using_relay"], bool):
                raise ValueError("using_relay must be a bool")
            kwargs["using_relay"] = extra["using_relay"]
        if extra.get("cache_tokens_left") is not None:
            tokens = extra["cache_tokens_left"]
            if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
                raise ValueError("cache_tokens_left must be a non-negative integer")
            kwargs["cache_tokens_left"] = tokens
        if extra.get("adapters") is not None:
            adapters = extra["adapters"]
            if not isinstance(adapters, (list, tuple)) or len(adapters) > MAX_ADAPTERS:
                raise ValueError(f"adapters must be a list of at most {MAX_ADAPTERS} strings")
            kwargs["adapters"] = tuple(_string(name, "adapter") for name in adapters)
        if extra.get("next_pings") is not None:
            kwargs["next_pings"] = _parse_pings(extra["next_pings"])
        info = cls(state=ServerState(state_value), throughput=_rate(throughput, "throughput"), **kwargs)
        if info.start_block is not None and info.end_block is not None and info.start_block >= info.end_block:
            raise ValueError("start_block must be below end_block")
        return info


def _parse_pings(pings: Any) -> dict[str, float]:
    if not isinstance(pings, dict) or len(pings) > MAX_NEXT_PINGS:
        raise ValueError(f"next_pings must be a dict of at most {MAX_NEXT_PINGS} entries")
    parsed = {}
    for peer, rtt in pings.items():
        peer = _string(peer, "next_pings key")
        if isinstance(rtt, bool) or not isinstance(rtt, (int, float)) or math.isnan(rtt) or rtt < 0:
            raise ValueError("next_pings values must be non-negative numbers or inf")
        parsed[peer] = float(rtt)
    return parsed


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """A `_petals.models` index entry."""

    num_blocks: int
    repository: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"num_blocks": self.num_blocks, "repository": self.repository}

    @classmethod
    def from_dict(cls, value: Any) -> ModelInfo:
        if not isinstance(value, dict):
            raise ValueError("model info must be a dict")
        num_blocks = value.get("num_blocks")
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or not 0 < num_blocks <= MAX_NUM_BLOCKS:
            raise ValueError(f"num_blocks must be an integer in [1, {MAX_NUM_BLOCKS}]")
        repository = value.get("repository")
        if repository is not None:
            repository = _string(repository, "repository")
        return cls(num_blocks=num_blocks, repository=repository)


@dataclasses.dataclass(frozen=True)
class RemoteSpanInfo:
    """One server's contiguous run of blocks `[start, end)` of one model."""

    peer_id: str  # base58
    start: int
    end: int
    server_info: ServerInfo

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def state(self) -> ServerState:
        return self.server_info.state
