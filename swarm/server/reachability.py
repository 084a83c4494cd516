"""Is this server reachable from the rest of the world?

A server behind NAT or a firewall can reach the swarm (and so announce itself) while nobody can
open a connection back to it; clients would then fail on it. Two ways to find out:
- Petals' reachability protocol (PROTOCOL.md, "Reachability and relays"): a peer asks a few others
  (`ReachabilityProtocol.rpc_check`) to dial it back directly. Bootstrap peers and directly reachable
  servers answer such checks (`ReachabilityService`).
- A health monitor (`/api/v1/is_reachable/<peer_id>`, as on health.petals.dev) tries to connect from outside.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from hivemind import DHT
from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.proto import dht_pb2

from swarm.relays import peer_id_of

logger = logging.getLogger(__name__)

CHECK_TIMEOUT = 5.0  # seconds for a peer to answer a check about itself; twice that to dial someone else
MAX_CHECKERS = 5  # peers asked to dial us back; direct if at least half of those who answered could
MAX_PEER_ID_BYTES = 64  # a peer id is a multihash: 34 bytes (RSA keys, SHA-256) or 38 (Ed25519 keys, inline)
MAX_CONCURRENT_CHECKS = 8  # checks for others at a time: strangers must not make us dial the world
# A probe that dials others directly, as a client out there would: no relay, no listening, no port mapping.
PROBE_OPTIONS = dict(dht_mode="client", use_relay=False, auto_nat=False, nat_port_map=False, no_listen=True)


class ReachabilityProtocol(ServicerBase):
    """`rpc_check(PingRequest(peer=NodeInfo(node_id))) -> PingResponse(available)`, Petals' handle name.

    Asked about itself, a peer says True; asked about another peer, it dials that peer by id from a
    probe without relays and says whether it answered.
    """

    def __init__(self, probe: P2P | None = None, timeout: float = CHECK_TIMEOUT):
        self.probe = probe
        self.timeout = timeout
        self._checks = asyncio.Semaphore(MAX_CONCURRENT_CHECKS)

    async def call_check(self, p2p: P2P, remote_peer: PeerID, check_peer: PeerID) -> bool | None:
        """Ask `remote_peer` (through `p2p`) whether it can dial `check_peer`; None if it did not answer."""
        request = dht_pb2.PingRequest(peer=dht_pb2.NodeInfo(node_id=check_peer.to_bytes()))
        timeout = self.timeout if remote_peer == check_peer else 2 * self.timeout
        try:
            stub = self.get_stub(p2p, remote_peer)
            response = await asyncio.wait_for(stub.rpc_check(request, timeout=timeout), timeout)
        except Exception as e:
            logger.debug("%s did not check %s: %r", remote_peer, check_peer, e)
            return None
        return bool(response.available)

    async def rpc_check(self, request: dht_pb2.PingRequest, context: P2PContext) -> dht_pb2.PingResponse:
        if not 0 < len(request.peer.node_id) <= MAX_PEER_ID_BYTES:  # base58 of a huge id would stall the loop
            return dht_pb2.PingResponse(available=False)
        check_peer = PeerID(request.peer.node_id)
        if check_peer == context.local_id:
            return dht_pb2.PingResponse(available=True)
        if self.probe is None or self._checks.locked():
            return dht_pb2.PingResponse(available=False)
        async with self._checks:
            available = await self.call_check(self.probe, check_peer, check_peer) is True
        logger.debug("Checked %s for %s: %s", check_peer, context.remote_id, available)
        return dht_pb2.PingResponse(available=available)


class ReachabilityService:
    """Answers other peers' reachability checks for a DHT peer, from a thread with its own event loop."""

    def __init__(self, dht: DHT):
        self._dht = dht
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), name="reachability", daemon=True)
        self._thread.start()
        self._ready.wait(60)

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        probe = None
        try:
            # A replica of our own: the DHT's cached one belongs to the event loop of whoever asked first.
            p2p = await P2P.replicate(self._dht.run_coroutine(_daemon_listen_maddr))
            own = [str(maddr) for maddr in await p2p.get_visible_maddrs(latest=True)]
            probe = await P2P.create(initial_peers=own, **PROBE_OPTIONS)
            protocol = ReachabilityProtocol(probe)
            await protocol.add_p2p_handlers(p2p)
            self._ready.set()
            await self._stop.wait()
            await protocol.remove_p2p_handlers(p2p)
        except Exception as e:
            logger.warning("Not answering reachability checks for others: %r", e)
        finally:
            self._ready.set()
            if probe is not None:
                await probe.shutdown()

    def shutdown(self) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


async def _daemon_listen_maddr(dht: DHT, node: DHTNode) -> Any:
    return node.p2p.daemon_listen_maddr


async def check_direct_reachability(
    initial_peers: Sequence[str], host_maddrs: Sequence[str], announce_maddrs: Sequence[str] = ()
) -> tuple[bool | None, str]:
    """Can peers of the swarm dial us directly on `host_maddrs` (or `announce_maddrs`)?

    A temporary peer listens where the server will, and up to MAX_CHECKERS peers (the initial peers
    first) are asked to dial it back. Returns (True/False, or None when nobody answered; "k/n" checks).
    """
    target = await P2P.create(
        initial_peers=list(initial_peers),
        host_maddrs=list(host_maddrs),
        announce_maddrs=list(announce_maddrs) or None,
        use_relay=False,
        auto_nat=False,
        nat_port_map=False,
    )
    try:
        checkers = []
        for maddr in initial_peers:
            try:
                checkers.append(PeerID.from_base58(peer_id_of(maddr)))
            except ValueError:
                continue
        checkers += [info.peer_id for info in await target.list_peers()]
        protocol = ReachabilityProtocol()
        await protocol.add_p2p_handlers(target)  # a checker's probe dials us and asks us about ourselves
        answers = []
        for checker in list(dict.fromkeys(checkers))[:MAX_CHECKERS]:
            answer = await protocol.call_check(target, checker, target.peer_id)
            if answer is not None:
                answers.append(answer)
    finally:
        await target.shutdown()
    summary = f"{sum(answers)}/{len(answers)}"
    if not answers:
        return None, summary
    return sum(answers) >= len(answers) / 2, summary


def check_reachability(health_url: str, peer_id: str, *, attempts: int = 3, timeout: float = 30.0) -> bool | None:
    """True/False as the monitor says; None when the monitor itself could not be asked."""
    url = f"{health_url.rstrip('/')}/api/v1/is_reachable/{peer_id}"
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                answer = json.loads(response.read(64 * 1024))
        except (urllib.error.URLError, OSError, ValueError) as e:
            logger.warning("Could not ask %s whether this server is reachable: %s", url, e)
            time.sleep(min(2**attempt, 10))
            continue
        if answer.get("success"):
            logger.info("The swarm can reach this server (checked by %s)", health_url)
            return True
        logger.error(
            "The swarm cannot reach this server: %s. Clients will not be able to use it. Open the port of "
            "--host-maddrs in your firewall or router, or give your public address with --announce-maddrs.",
            answer.get("message") or "no answer to a ping from the health monitor",
        )
        return False
    return None
