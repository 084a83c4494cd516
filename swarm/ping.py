"""Reachability pings: `rpc_info` for block servers, a DHT ping for DHT-only peers (bootstrap peers).

Shared by the client's routing (round-trip times) and the health monitor (reachability and errors).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from swarm.server.handler import TransformerConnectionHandler

MAX_ERROR_LENGTH = 300


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
