"""Client settings: a small dataclass instead of a maze of keyword arguments."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


@dataclasses.dataclass
class ClientConfig:
    initial_peers: Sequence[str] = ()
    dht_prefix: str | None = None  # default: derived from the model name as Petals does
    request_timeout: float = 30.0  # one RPC or one inference step
    connect_timeout: float = 10.0  # opening an inference stream
    max_retries: int = 4  # replacement servers tried for one step before giving up
    ban_seconds: float = 15.0  # how long a failed server is avoided
    routing_refresh: float = 30.0  # seconds between DHT reads of the swarm
    missing_blocks_timeout: float = 30.0  # how long to wait for uncovered blocks to appear
    alloc_timeout: float = 30.0  # how long a server may wait to fit our attention cache
    # Tokens (rows x new tokens) sent in one request: our servers' limit. Longer prefills and replays go out
    # in several steps; a server that refuses even that teaches the client its own (smaller) limit.
    max_tokens_per_request: int = 8192
    # Servers push each step's outputs to the next server directly: a step then crosses one link fewer
    # per extra server (client -> A -> B -> client instead of client -> A -> client -> B -> client), but
    # both servers spend CPU on it, which on one machine (loopback) costs more than it saves.
    # None: push wherever the measured round trips say it saves time (routing.PUSH_MIN_SAVING per step);
    # True: always; False: never.
    use_server_to_server: bool | None = None
    host_maddrs: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",)
    # Dial servers behind NAT through their relays (README, "Serving from home"); False: p2pd relays nothing.
    use_relay: bool = True
    # A LoRA adapter served by the swarm (its name as servers announce it): only servers that
    # announce it are used, and they run every request with it. None: the base model.
    active_adapter: str | None = None
