"""Probes that dial out on a stranger's request (`/api/v1/is_reachable/<peer>`), cached and rate-limited.

Each answer is reused for `ttl` seconds and concurrent askers for the same key share one probe;
a client (an IPv6 client: its /64, `config.proxy.client_key`) may start at most `per_client` new
probes per `window` seconds, and at most `concurrency`
probes run at once. Beyond that the caller gets `TooManyProbes` (answer 429), not a dial.
Lives on the ASGI event loop of one process (no locks needed).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from config.proxy import client_key

MAX_KEYS = 10_000  # bounds the memory a flood of distinct keys or clients can take


class TooManyProbes(Exception):
    pass


class ProbeLimiter:
    def __init__(self, ttl: float = 60.0, per_client: int = 10, window: float = 60.0, concurrency: int = 8):
        self.ttl, self.per_client, self.window, self.concurrency = ttl, per_client, window, concurrency
        self._answers: dict[str, tuple[float, Any]] = {}
        self._running: dict[str, asyncio.Future] = {}
        self._starts: dict[str, deque[float]] = {}
        self.probes = 0  # probes actually run (for tests and logs)

    async def run(self, key: str, client: str, probe: Callable[[], Awaitable[Any]]) -> Any:
        now = time.monotonic()
        cached = self._answers.get(key)
        if cached is not None and now - cached[0] < self.ttl:
            return cached[1]
        if key in self._running:
            return await asyncio.shield(self._running[key])
        self._admit(client, now)
        future = asyncio.get_running_loop().create_future()
        self._running[key] = future
        self.probes += 1
        try:
            answer = await probe()
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # retrieved: no "never retrieved" warning when nobody else waited
            raise
        finally:
            self._running.pop(key, None)
        self._remember(key, answer)
        future.set_result(answer)
        return answer

    def _admit(self, client: str, now: float) -> None:
        if len(self._running) >= self.concurrency:
            raise TooManyProbes("too many reachability checks are running; try again in a few seconds")
        starts = self._starts.setdefault(client_key(client), deque())
        while starts and now - starts[0] >= self.window:
            starts.popleft()
        if len(starts) >= self.per_client:
            wait = self.window - (now - starts[0])
            raise TooManyProbes(f"at most {self.per_client} checks per {self.window:g} s; try again in {wait:.0f} s")
        starts.append(now)
        if len(self._starts) > MAX_KEYS:
            self._starts = {c: s for c, s in self._starts.items() if s and now - s[-1] < self.window}

    def _remember(self, key: str, answer: Any) -> None:
        now = time.monotonic()
        self._answers[key] = (now, answer)
        if len(self._answers) > MAX_KEYS:
            self._answers = {k: v for k, v in self._answers.items() if now - v[0] < self.ttl}
