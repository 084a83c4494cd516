"""Which servers a client talks to: reads the swarm from the DHT and picks chains of spans.

- Inference: the chain with the lowest expected latency per step, from measured round trips
  (or the servers' announced pings) and each server's announced per-block speed.
- Forward/backward: at each position a server is drawn with probability proportional to its
  throughput, which spreads training load over the swarm.
Failed servers are banned for a while and routes avoid them; a server that refused a request as
invalid is not (`rejection`): the request, not the server, was at fault.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
import re
import time

from hivemind import DHT
from hivemind.p2p import P2P, P2PHandlerError, PeerID

from swarm.client.config import ClientConfig
from swarm.data_structures import RemoteSpanInfo
from swarm.dht import SwarmView, fetch_swarm
from swarm.ping import ping_server, ping_within
from swarm.server.handler import MAX_BATCH_SIZE, TransformerConnectionHandler
from swarm.streams import RemoteError

logger = logging.getLogger(__name__)

DEFAULT_RTT = 0.05  # seconds assumed for a server we have not pinged yet
HOP_PENALTY = 0.002  # prefer fewer hops when latencies tie
PING_CONCURRENCY = 32  # servers pinged at once when the swarm is read
PING_TIMEOUT = 2.0  # seconds for one server's ping
PING_BUDGET = 3.0  # seconds of pinging per refresh at most; the rest keep DEFAULT_RTT until a later refresh
# A new server's first ping also dials it (TCP, encryption and multiplexer handshakes: several round trips on a
# slow link), so a server pinged second may look nearer than it is; the least of a few probes is its round trip.
PING_PROBES = 2
PUSH_MIN_SAVING = 0.004  # seconds a push must save per step to be worth both servers' extra CPU
# The least limit of tokens per request (rows x new tokens) that a server's refusal may teach us. Ours take
# 8192 (ClientConfig.max_tokens_per_request); a claim of a few tokens would stretch a prefill to thousands of steps.
MIN_TOKENS_PER_REQUEST = 1024


class MissingBlocksError(RuntimeError):
    """No online server holds some blocks of the model."""

    def __init__(self, message: str, *, model_name: str, blocks: list[int]):
        super().__init__(message)
        self.model_name = model_name
        self.blocks = blocks  # the uncovered block indices


class RequestRejected(ValueError):
    """A request that a server refused as invalid, or that the servers' limits rule out before it is sent:
    the request, not a server, is at fault, so no server is banned for it and no other is tried."""


@dataclasses.dataclass(frozen=True)
class Rejection:
    """A server's answer that a request of `rows` x `tokens` broke one of its limits (see `rejection`)."""

    reason: str
    token_limit: int | None = None  # set when the request held more tokens than the server takes at once


# How our servers (swarm.server.handler) word the limits a client can break. Its messages travel as bare
# text (inference streams) or inside hivemind's P2PHandlerError text (forward and backward).
_TOKEN_LIMIT = re.compile(r"\bat most (\d{1,9}) tokens per request\b")
_BATCH_LIMIT = re.compile(r"\bbatch size must be between 1 and (\d{1,9})\b")


def rejection(error: BaseException, rows: int, tokens: int) -> Rejection | None:
    """The limit that a server's error says our request of `rows` x `tokens` broke, if it did.

    Only claims that hold for what was sent are believed, and only limits our servers really have: a
    faulty or hostile server cannot escape a ban by blaming the client (nor slow us down to a token per
    request).
    """
    if not isinstance(error, (RemoteError, P2PHandlerError)):
        return None  # no answer from the server: a timeout, a broken stream, ...
    text = str(error)
    match = _TOKEN_LIMIT.search(text)
    if match and MIN_TOKENS_PER_REQUEST <= int(match[1]) < rows * tokens:
        return Rejection(match[0], token_limit=int(match[1]))
    match = _BATCH_LIMIT.search(text)
    if match and MAX_BATCH_SIZE <= int(match[1]) < rows:
        return Rejection(match[0])
    return None


@dataclasses.dataclass(frozen=True)
class RouteSpan:
    """Blocks [start, end) run on one server."""

    peer_id: str
    start: int
    end: int


def describe_blocks(blocks: list[int]) -> str:
    """[4, 5, 6, 7, 9] -> '4–7, 9'."""
    ranges, first = [], None
    for i, block in enumerate(blocks):
        if first is None:
            first = block
        if i + 1 == len(blocks) or blocks[i + 1] != block + 1:
            ranges.append(f"{first}" if first == block else f"{first}–{block}")
            first = None
    return ", ".join(ranges)


class SequenceManager:
    """The client's view of one model's servers, refreshed from the DHT as needed."""

    def __init__(self, dht: DHT, p2p: P2P, dht_prefix: str, num_blocks: int, config: ClientConfig, model_name: str):
        self.dht, self.p2p = dht, p2p
        self.dht_prefix, self.num_blocks = dht_prefix, num_blocks
        self.config = config
        self.model_name = model_name
        self.view: SwarmView | None = None
        self._updated_at = 0.0
        self._banned_until: dict[str, float] = {}
        self._token_limits: dict[str, int] = {}  # peer id -> the lower limit its refusal taught us
        self.rtts: dict[str, float] = {}
        self._lock = asyncio.Lock()

    # ----- swarm state -----

    async def refresh(self, force: bool = False) -> SwarmView:
        async with self._lock:
            if force or self.view is None or time.monotonic() - self._updated_at > self.config.routing_refresh:
                self.view = await fetch_swarm(self.dht, self.dht_prefix, self.num_blocks, wait=False)
                self._updated_at = time.monotonic()
                await self._ping_new_servers()
            return self.view

    async def _ping_new_servers(self) -> None:
        # New servers, and unreachable ones again: a server may have been busy starting up.
        # Bounded in concurrency and time: thousands of fake announcements must not stall every route.
        # Never-pinged servers first, then the longest spans (the most useful ones).
        spans = [s for s in self.view.online_spans() if self.rtts.get(s.peer_id, float("inf")) == float("inf")]
        spans.sort(key=lambda s: (s.peer_id in self.rtts, -(s.end - s.start)))
        rtts = await ping_within(
            (s.peer_id for s in spans), self.ping, concurrency=PING_CONCURRENCY, budget=PING_BUDGET
        )
        self.rtts.update(rtts)

    async def ping(self, peer_id: str, timeout: float = PING_TIMEOUT) -> float:
        """The server's round trip in seconds (inf if unreachable): the least of PING_PROBES probes."""
        best = float("inf")
        for _ in range(PING_PROBES):
            rtt = (await ping_server(self.p2p, peer_id, timeout)).round_trip
            if rtt == float("inf"):
                break
            best = min(best, rtt)
        return best

    def push_saving(self, sender: str, receiver: str) -> float:
        """Seconds per step saved when `sender` pushes its outputs straight to `receiver` instead of this
        client relaying them: the one-way trips sender -> client -> receiver, minus sender -> receiver.

        The direct trip is the sender's announced ping to the receiver (Petals' next_pings) if it has one;
        otherwise it is assumed to be as long as the longer of the client's two links (no shortcut).
        """
        to_sender, to_receiver = self.rtts.get(sender, float("inf")), self.rtts.get(receiver, float("inf"))
        if not math.isfinite(to_sender + to_receiver):
            return 0.0  # not measured: no reason to push
        span = self.view.spans.get(sender) if self.view is not None else None
        announced = span.server_info.next_pings if span is not None else None
        direct = (announced or {}).get(receiver)
        if direct is None or not math.isfinite(direct):
            direct = max(to_sender, to_receiver)
        return (to_sender + to_receiver - direct) / 2

    def stub(self, peer_id: str):
        return TransformerConnectionHandler.get_stub(self.p2p, PeerID.from_base58(peer_id))

    def ban(self, peer_id: str) -> None:
        logger.info("Avoiding server %s for %.0f s after a failure", peer_id, self.config.ban_seconds)
        self._banned_until[peer_id] = time.monotonic() + self.config.ban_seconds
        self._updated_at = 0.0  # re-read the swarm before the next route

    def banned(self) -> set[str]:
        """The servers avoided right now."""
        now = time.monotonic()
        return {peer_id for peer_id, until in self._banned_until.items() if until > now}

    def tokens_per_request(self, peer_id: str) -> int:
        """The most tokens (rows x new tokens) to send this server in one request.

        Servers do not announce their limit: ours is assumed (config.max_tokens_per_request) until a
        server refuses a request as too large, and its own figure is used from then on.
        """
        assumed = self.config.max_tokens_per_request
        return min(assumed, self._token_limits.get(peer_id, assumed))

    def min_tokens_per_request(self) -> int:
        """The limit that suits every server known so far (for requests whose route is not chosen yet)."""
        return min([self.config.max_tokens_per_request, *self._token_limits.values()])

    def learn_token_limit(self, peer_id: str, limit: int) -> None:
        logger.info("Server %s takes at most %d tokens per request; sending it less at a time", peer_id, limit)
        self._token_limits[peer_id] = min(limit, self._token_limits.get(peer_id, limit))

    def _usable_spans(self) -> list[RemoteSpanInfo]:
        now = time.monotonic()
        adapter = self.config.active_adapter
        return [
            span
            for span in self.view.online_spans()
            if self._banned_until.get(span.peer_id, 0.0) <= now
            and self.rtts.get(span.peer_id) != float("inf")
            and (not adapter or adapter in span.server_info.adapters)  # only servers that run our adapter
        ]

    # ----- routes -----

    async def make_route(self, start: int, end: int, mode: str = "latency") -> list[RouteSpan]:
        """A chain of spans covering blocks [start, end); waits a bounded time for missing blocks."""
        deadline = time.monotonic() + self.config.missing_blocks_timeout
        force = False
        while True:
            await self.refresh(force=force)
            spans = self._usable_spans()
            route = (
                _min_latency_route(spans, start, end, self._step_cost)
                if mode == "latency"
                else (_throughput_route(spans, start, end))
            )
            if route is not None:
                return route
            if time.monotonic() >= deadline:
                covered = {i for s in spans for i in range(s.start, s.end)}
                missing = [i for i in range(start, end) if i not in covered]
                adapter = self.config.active_adapter
                servers = f"server with adapter {adapter!r}" if adapter else "server"
                raise MissingBlocksError(
                    f"blocks {describe_blocks(missing)} of {self.model_name} are not served by any reachable "
                    f"{servers} right now (waited {self.config.missing_blocks_timeout:.0f} s)",
                    model_name=self.model_name,
                    blocks=missing,
                )
            force = True
            await asyncio.sleep(min(1.0, max(deadline - time.monotonic(), 0.0)))

    def _step_cost(self, span: RemoteSpanInfo, blocks: int) -> float:
        rtt = self.rtts.get(span.peer_id, DEFAULT_RTT)
        rps = span.server_info.inference_rps or span.server_info.throughput
        compute = blocks / rps if rps and rps > 0 else blocks * 0.01
        return rtt + compute + HOP_PENALTY


def _min_latency_route(spans, start: int, end: int, cost) -> list[RouteSpan] | None:
    """Dynamic programming over block positions: the cheapest chain of spans from start to end.

    A chain may leave a span early where another span begins, to switch to a faster server.
    """
    switch_points = sorted({s.start for s in spans if start < s.start < end} | {end})
    best: dict[int, tuple[float, list[RouteSpan]]] = {start: (0.0, [])}
    for position in range(start, end):
        if position not in best:
            continue
        total, route = best[position]
        for span in spans:
            if not span.start <= position < span.end:
                continue
            last = min(span.end, end)
            stops = [p for p in switch_points if position < p < last] + [last]
            for stop in stops:
                candidate = total + cost(span, stop - position)
                if stop not in best or candidate < best[stop][0]:
                    best[stop] = (candidate, [*route, RouteSpan(span.peer_id, position, stop)])
    return best[end][1] if end in best else None


def _throughput_route(spans, start: int, end: int) -> list[RouteSpan] | None:
    route, position = [], start
    while position < end:
        candidates = [s for s in spans if s.start <= position < s.end]
        if not candidates:
            return None
        weights = [max(s.server_info.throughput, 1e-6) for s in candidates]
        span = random.choices(candidates, weights)[0]
        stop = min(span.end, end)
        route.append(RouteSpan(span.peer_id, position, stop))
        position = stop
    return route
