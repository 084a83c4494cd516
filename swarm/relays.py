"""libp2p circuit relays (v2) through hivemind's p2pd: what a peer behind NAT needs to be dialed.

A server that others cannot dial reserves a slot on a relay (a public peer, by default the swarm's
bootstrap peers) and announces `<relay>/p2p-circuit` as its address; anyone who knows that address, or
finds it through the libp2p DHT, reaches the server through the relay.

hivemind's `P2P.create` does not expose p2pd's `-relayDiscovery`, so this module adds it to the p2pd
command line (`p2pd_flags`): with `-relayDiscovery=0` and `-trustedRelays`, p2pd treats the relays as
static relays and reserves a slot at once. Left on (hivemind's default), autorelay waits for more
candidates than a small swarm has and reserves only after its 3-minute boot delay.

p2pd relays for others even with `-relay=0` or `-relayService=0`: its default config has relaying on and
flags can only turn settings on. A peer that must not relay (nor use relays) starts p2pd with a config
file that turns relaying off (`-f`, `RELAY_OFF_CONFIG`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from hivemind.p2p import P2P, PeerID
from hivemind.utils.multiaddr import Multiaddr

logger = logging.getLogger(__name__)

CIRCUIT = "/p2p-circuit"
_P2P_CODE = b"\xa5\x03"  # varint(421): the /p2p/ protocol in binary multiaddrs
_CIRCUIT_CODE = b"\xa2\x02"  # varint(290): /p2p-circuit

# Flags added to every p2pd this process starts, on top of what hivemind passes (set by `p2pd_flags`).
_extra_flags: dict[str, Any] = {}
_original_make_process_args = P2P._make_process_args


def _make_process_args_with_extra_flags(*args: Any, **kwargs: Any) -> list[str]:
    flags = dict(_extra_flags)
    if not kwargs.get("trustedRelays"):  # p2pd refuses autorelay without discovery unless relays are given
        flags.pop("relayDiscovery", None)
    return _original_make_process_args(*args, **{**kwargs, **flags})


P2P._make_process_args = staticmethod(_make_process_args_with_extra_flags)


def set_p2pd_flags(flags: dict[str, Any]) -> None:
    """Add `flags` to every p2pd that this process starts from now on (a DHT process sets its own)."""
    _extra_flags.clear()
    _extra_flags.update(flags)


@contextlib.contextmanager
def p2pd_flags(flags: dict[str, Any]) -> Iterator[None]:
    """Add `flags` to the p2pd daemons started inside the block (in this process)."""
    saved = dict(_extra_flags)
    set_p2pd_flags({**saved, **flags})
    try:
        yield
    finally:
        set_p2pd_flags(saved)


RELAY_OFF_CONFIG = '{"Relay": {"Enabled": false}}'


def relay_p2pd_flags(*, use_relay: bool = True, static_relays: bool = False) -> dict[str, Any]:
    """The p2pd flags for a peer's relay settings that hivemind cannot pass itself."""
    flags: dict[str, Any] = {}
    if not use_relay:
        flags["f"] = _relay_off_config_file()
    if static_relays:
        flags["relayDiscovery"] = False
    return flags


def _relay_off_config_file() -> str:
    path = Path(tempfile.gettempdir()) / "swarm-p2pd-relay-off.json"
    if not path.exists() or path.read_text() != RELAY_OFF_CONFIG:
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(RELAY_OFF_CONFIG)
        partial.replace(path)  # atomic: a p2pd starting meanwhile reads the old file or the new, never half
    return str(path)


def peer_id_of(maddr: str) -> str:
    """The peer id in a multiaddr's last `/p2p/` part; ValueError without one."""
    _, sep, peer_id = str(maddr).rpartition("/p2p/")
    if not sep or not peer_id or "/" in peer_id:
        raise ValueError(f"{maddr} names no peer (it should end with /p2p/<peer id>)")
    return peer_id


def circuit_addresses(relays: Sequence[str]) -> list[str]:
    """What a relayed peer announces: `<relay maddr>/p2p-circuit` for each relay."""
    return [f"{relay}{CIRCUIT}" for relay in relays if CIRCUIT not in str(relay)]


def circuit_maddr(relay: str, peer_id: PeerID) -> Multiaddr:
    """`<relay>/p2p-circuit/p2p/<peer_id>` in the binary form p2pd parses.

    hivemind's Multiaddr writes /p2p/ values as CIDs, which p2pd's control protocol rejects ("length
    greater than remaining number of bytes"); p2pd wants the bare multihash, written here by hand.
    """
    transport, _, relay_id = str(relay).partition("/p2p/")
    if not relay_id:
        raise ValueError(f"{relay} names no relay peer (it should end with /p2p/<peer id>)")

    def p2p_part(peer: PeerID) -> bytes:
        raw = peer.to_bytes()
        return _P2P_CODE + bytes([len(raw)]) + raw

    encoded = Multiaddr(transport).to_bytes() + p2p_part(PeerID.from_base58(relay_id)) + _CIRCUIT_CODE
    return Multiaddr(encoded + p2p_part(peer_id))


async def connection_addresses(p2p: P2P, peer_id: str) -> list[str]:
    """The addresses of `p2p`'s open connections to `peer_id`; a relayed one ends in /p2p-circuit."""
    return [str(addr) for info in await p2p.list_peers() if info.peer_id.to_base58() == peer_id for addr in info.addrs]


async def dial_through_relays(peer_id: PeerID, relays: Sequence[str], timeout: float) -> str | None:
    """Dial `peer_id` through each relay, as a client on the relay's side would, until one works or `timeout`.

    Returns the relay that carried the connection, or None. Used by a server to learn that its relay
    reservation works before it announces itself.
    """
    deadline = time.monotonic() + timeout
    probe = await P2P.create(dht_mode="client", no_listen=True, auto_nat=False, nat_port_map=False, use_relay=True)
    last_error = "no relay to try"
    try:
        while True:
            for relay in relays:
                try:
                    await asyncio.wait_for(probe._client.connect(peer_id, [circuit_maddr(relay, peer_id)]), 10)
                    return relay
                except Exception as e:  # NO_RESERVATION until the relay has our reservation
                    last_error = str(e).strip().splitlines()[-1][:300] if str(e).strip() else repr(e)
            if time.monotonic() >= deadline:
                logger.info("No relay carried a connection to %s within %.0f s: %s", peer_id, timeout, last_error)
                return None
            await asyncio.sleep(min(1.0, max(deadline - time.monotonic(), 0.0)))
    finally:
        await probe.shutdown()
