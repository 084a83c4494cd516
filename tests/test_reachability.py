"""Petals' reachability check (`ReachabilityProtocol.rpc_check`) on loopback, where every peer is direct.

A bootstrap peer and a block server answer checks; a server that others can dial stays direct: it
says so, announces `using_relay=False`, and clients reach it with no relay hop. (Servers behind NAT:
tests/test_nat.py.)
"""

from __future__ import annotations

import pytest
import torch
from hivemind.p2p import PeerID

from swarm import AutoDistributedModelForCausalLM
from swarm.client.event_loop import run_sync
from swarm.relays import connection_addresses
from swarm.server.reachability import ReachabilityProtocol, check_direct_reachability
from tests.conftest import DEMO_MODEL, client_peer, start_swarm

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def swarm(make_swarm):
    swarm = start_swarm(make_swarm, "0:8")
    yield swarm
    swarm.close()


def test_a_server_that_peers_can_dial_stays_direct(swarm):
    server = swarm.processes[-1]
    assert "Peers of the swarm can reach this server directly (1/1 checks)" in server.output()
    assert "relay" not in server.output().lower()

    model = AutoDistributedModelForCausalLM.from_pretrained(DEMO_MODEL, initial_peers=swarm.initial_peers)
    try:
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False)
        addrs = run_sync(connection_addresses(model.manager.p2p, server.peer_id), timeout=10)
        assert addrs and not any("/p2p-circuit" in addr for addr in addrs)
    finally:
        model.close()


def test_peers_answer_checks_about_themselves_and_others(swarm):
    server_id = PeerID.from_base58(swarm.processes[-1].peer_id)
    bootstrap_id = PeerID.from_base58(swarm.initial_peers[0].rsplit("/p2p/", 1)[1])
    protocol = ReachabilityProtocol()
    with client_peer(swarm) as (p2p, _):
        assert run_sync(protocol.call_check(p2p, bootstrap_id, bootstrap_id), timeout=30) is True
        assert run_sync(protocol.call_check(p2p, bootstrap_id, server_id), timeout=30) is True  # it dials the server
        assert run_sync(protocol.call_check(p2p, server_id, bootstrap_id), timeout=30) is True  # servers check too
        nobody = PeerID.from_base58("12D3KooWNS8BUH27E7cxS43fK1Ash9ZbpZzHsGvy71oXp7NyQBDU")
        assert run_sync(protocol.call_check(p2p, bootstrap_id, nobody), timeout=60) is False


def test_check_direct_reachability_on_loopback(swarm):
    direct, checks = run_sync(check_direct_reachability(swarm.initial_peers, ["/ip4/127.0.0.1/tcp/0"]), timeout=60)
    could, asked = checks.split("/")
    assert direct is True and could == asked and int(asked) >= 1  # the bootstrap peer, and the server if found
