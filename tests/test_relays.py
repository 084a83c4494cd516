"""Relay settings and addresses (swarm.relays, swarm.dht.RelaySettings) and answers to reachability checks:
pure logic, no network."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import dht_pb2

from swarm.dht import RelaySettings
from swarm.relays import CIRCUIT, circuit_addresses, circuit_maddr, p2pd_flags, peer_id_of, relay_p2pd_flags
from swarm.server.reachability import ReachabilityProtocol

RELAY_ID = "12D3KooWSkWCQqchb7vM9JXfPdCz6zsqwYusaXpFqBZ5NPe2rtHo"
SERVER_ID = "12D3KooWNS8BUH27E7cxS43fK1Ash9ZbpZzHsGvy71oXp7NyQBDU"
RELAY = f"/ip4/203.0.113.7/tcp/31337/p2p/{RELAY_ID}"


def test_circuit_maddr_carries_bare_peer_multihashes() -> None:
    """p2pd parses /p2p/ values as multihashes; hivemind's Multiaddr would write CIDs it rejects."""
    server = PeerID.from_base58(SERVER_ID)
    maddr = circuit_maddr(RELAY, server)
    assert str(maddr) == f"{RELAY}{CIRCUIT}/p2p/{SERVER_ID}"
    encoded = maddr.to_bytes()
    for peer in (PeerID.from_base58(RELAY_ID), server):
        raw = peer.to_bytes()
        assert b"\xa5\x03" + bytes([len(raw)]) + raw in encoded  # /p2p/ code, length, multihash
    assert encoded.endswith(server.to_bytes())


def test_circuit_maddr_needs_the_relays_peer_id() -> None:
    with pytest.raises(ValueError, match="names no relay peer"):
        circuit_maddr("/ip4/203.0.113.7/tcp/31337", PeerID.from_base58(SERVER_ID))


def test_circuit_addresses_and_peer_ids() -> None:
    assert circuit_addresses([RELAY, f"{RELAY}{CIRCUIT}"]) == [f"{RELAY}{CIRCUIT}"]  # no circuit over a circuit
    assert peer_id_of(RELAY) == RELAY_ID
    with pytest.raises(ValueError, match="names no peer"):
        peer_id_of("/ip4/203.0.113.7/tcp/31337")


def test_relay_settings_for_each_kind_of_peer() -> None:
    client = RelaySettings()
    assert client.p2p_kwargs() == {"use_relay": True} and client.p2pd_flags() == {}
    public = RelaySettings(public=True)
    assert public.p2p_kwargs() == {"use_relay": True, "force_reachability": "public"}
    home = RelaySettings(serve_through=(RELAY,))
    assert home.p2p_kwargs() == {
        "use_relay": True,
        "use_auto_relay": True,
        "trusted_relays": [RELAY],
        "force_reachability": "private",
    }
    assert home.p2pd_flags() == {"relayDiscovery": False}  # reserve on the static relays at once


def test_relaying_off_goes_through_a_config_file() -> None:
    """p2pd's flags can only turn relaying on; its config file turns it off."""
    flags = relay_p2pd_flags(use_relay=False)
    assert json.loads(Path(flags["f"]).read_text()) == {"Relay": {"Enabled": False}}
    assert RelaySettings(use_relay=False).p2p_kwargs() == {"use_relay": False}


def test_extra_flags_reach_the_p2pd_command_line_only_where_they_are_allowed() -> None:
    with p2pd_flags({"relayDiscovery": False}):
        static = P2P._make_process_args("p2pd", autoRelay=True, trustedRelays=RELAY)
        discovery = P2P._make_process_args("p2pd", autoRelay=True)
    assert "-relayDiscovery=0" in static
    assert not any(arg.startswith("-relayDiscovery") for arg in discovery)  # p2pd would refuse to start
    assert not any(arg.startswith("-relayDiscovery") for arg in P2P._make_process_args("p2pd", trustedRelays=RELAY))


def check(protocol: ReachabilityProtocol, node_id: bytes) -> bool:
    request = dht_pb2.PingRequest(peer=dht_pb2.NodeInfo(node_id=node_id))
    context = P2PContext(handle_name="ReachabilityProtocol.rpc_check", local_id=PeerID.from_base58(SERVER_ID))
    return asyncio.run(protocol.rpc_check(request, context)).available


def test_rpc_check_answers_about_itself_and_refuses_bad_ids_without_dialing() -> None:
    protocol = ReachabilityProtocol(probe=None)  # no probe: any dial would fail the test with an error
    assert check(protocol, PeerID.from_base58(SERVER_ID).to_bytes()) is True
    assert check(protocol, b"") is False
    assert check(protocol, b"\x12" * 5_000_000) is False  # refused before any work on it
    assert check(protocol, PeerID.from_base58(RELAY_ID).to_bytes()) is False  # cannot dial: says so
