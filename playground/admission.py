"""Bounds on concurrent inference sessions: per client address and per process.

Each open session reserves attention caches on every server of its route, so the number a
single visitor (or everyone together) may hold open is capped. A client is an IPv4 address or an
IPv6 /64 (`config.proxy.client_key`).
"""

from __future__ import annotations

from django.conf import settings

from config.client_caps import ClientCaps
from config.proxy import client_key
from playground.errors import LimitExceeded


class SessionSlot:
    """One held session; `release()` is idempotent."""

    def __init__(self, admission: Admission, key: str):
        self._admission, self.key = admission, key
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._admission._release(self.key)


class Admission:
    def __init__(self) -> None:
        self._caps = ClientCaps()

    @property
    def total(self) -> int:
        return self._caps.total

    def acquire(self, address: str) -> SessionSlot:
        per_client, overall = settings.PLAYGROUND_SESSIONS_PER_CLIENT, settings.PLAYGROUND_MAX_SESSIONS
        key = client_key(address)
        refused = self._caps.acquire(key, per_client, overall)
        if refused == "client":
            raise LimitExceeded(
                f"too many open sessions from your address (limit {per_client}); close another chat first"
            )
        if refused == "total":
            raise LimitExceeded(f"the server is busy ({overall} sessions open); try again in a minute")
        return SessionSlot(self, key)

    def _release(self, key: str) -> None:
        self._caps.release(key)

    def count(self, address: str) -> int:
        return self._caps.count(client_key(address))


admission = Admission()
