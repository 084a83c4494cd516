"""Counting what each client holds open (chat sessions, status sockets) against a per-client and a total cap.

A client is `config.proxy.client_key` of its address: an IPv4 address or an IPv6 /64.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Literal

Refusal = Literal["client", "total"]


class ClientCaps:
    """Thread-safe counts of held slots per client key; a slot is taken with `acquire` and given back with `release`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: Counter[str] = Counter()

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self._held.values())

    def count(self, key: str) -> int:
        with self._lock:
            return self._held[key]

    def acquire(self, key: str, per_client: int, overall: int) -> Refusal | None:
        """Take a slot for `key`; returns None, or which cap refused it (the client's own, or the total)."""
        with self._lock:
            if self._held[key] >= per_client:
                return "client"
            if sum(self._held.values()) >= overall:
                return "total"
            self._held[key] += 1
            return None

    def release(self, key: str) -> None:
        with self._lock:
            self._held[key] -= 1
            if self._held[key] <= 0:
                del self._held[key]
