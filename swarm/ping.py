"""Reachability pings: `rpc_info` for block servers, a DHT ping for DHT-only peers (bootstrap peers).

Shared by the client's routing (round-trip times) and the health monitor (reachability and errors).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from swarm.server.handler import TransformerConnectionHandler

MAX_ERROR_LENGTH = 300
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class PingResult:
    reachable: bool
    rtt: float | None = None  # seconds; None unless the peer answered the ping itself
    error: str | None = None

    @property
    def round_trip(self) -> float:
        """Seconds for routing: inf when the peer did not answer the ping itself."""
        return self.rtt if self.rtt is not None else float("inf")


def _is_protocol_not_supported(error: Exception) -> bool:
    # A joining server has not registered its handlers yet; the daemon answers for it, so it is reachable.
    # (Older p2pd says "protocol not supported", newer "protocols not supported: [...]".)
    message = str(error).lower()
    return "protocol not supported" in message or "protocols not supported" in message


def _describe(error: Exception) -> str:
    return (str(error) or repr(error))[:MAX_ERROR_LENGTH]


async def ping_server(p2p: P2P, peer_id: str, timeout: float) -> PingResult:
    """Call the server's `rpc_info` (empty uid: no schemas, a tiny answer) and time the round trip."""
    try:
        stub = TransformerConnectionHandler.get_stub(p2p, PeerID.from_base58(peer_id))
        began = time.perf_counter()
        await asyncio.wait_for(stub.rpc_info(runtime_pb2.ExpertUID(uid=""), timeout=timeout), timeout)
        return PingResult(reachable=True, rtt=time.perf_counter() - began)
    except TimeoutError:
        return PingResult(reachable=False, error=f"no answer within {timeout:g} s (a firewall may block connections)")
    except Exception as e:
        if _is_protocol_not_supported(e):
            return PingResult(reachable=True)
        return PingResult(reachable=False, error=_describe(e))


async def ping_server_in_dht(dht: object, node: DHTNode, *, peer_id: str, timeout: float) -> PingResult:
    """`ping_server` from inside a DHT process (`DHT.run_coroutine`, which imports it there by name)."""
    return await ping_server(node.p2p, peer_id, timeout)


async def ping_dht_peer(node: DHTNode, peer_id: str, timeout: float) -> PingResult:
    """A DHT-level ping, for peers that run only the DHT (they do not serve rpc_info)."""
    try:
        peer = PeerID.from_base58(peer_id)
        began = time.perf_counter()
        answer = await asyncio.wait_for(node.protocol.call_ping(peer), timeout)
    except TimeoutError:
        return PingResult(reachable=False, error=f"no answer within {timeout:g} s")
    except Exception as e:
        return PingResult(reachable=False, error=_describe(e))
    if answer is None:
        return PingResult(reachable=False, error="did not answer the DHT ping")
    return PingResult(reachable=True, rtt=time.perf_counter() - began)


async def ping_within(
    peers: Iterable[str], ping: Callable[[str], Awaitable[T]], *, concurrency: int, budget: float
) -> dict[str, T]:
    """Ping `peers` in the order given, at most `concurrency` at a time and for at most `budget` seconds in all.

    Peers not answered within the budget are left out of the result (their pings are cancelled), so a
    flood of announced peers costs a bounded time; the caller pings them again later.
    """
    results: dict[str, T] = {}
    limit = asyncio.Semaphore(max(concurrency, 1))

    async def one(peer: str) -> None:
        async with limit:
            results[peer] = await ping(peer)

    tasks = [asyncio.create_task(one(peer)) for peer in dict.fromkeys(peers)]
    if not tasks:
        return results
    try:
        await asyncio.wait(tasks, timeout=budget)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return results
