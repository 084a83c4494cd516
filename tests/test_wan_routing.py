"""Routing over slow links: of two replicas of a span, the client uses the near one.

Each server sits behind a swarm.netsim proxy process (50 ms one way for one, 5 ms for the other)
and announces only the proxy's address, so every connection to it crosses that link.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch

from swarm import AutoDistributedModelForCausalLM
from swarm.client import routing
from swarm.client.config import ClientConfig
from swarm.client.event_loop import run_sync
from swarm.ping import PingResult
from tests.conftest import DEMO_MODEL


def manager_with(rtts: dict[str, float], next_pings: dict[str, dict[str, float]] | None = None):
    manager = routing.SequenceManager(None, None, "demo-hf", 8, ClientConfig(), "demo")
    manager.rtts = dict(rtts)
    infos = {
        peer: SimpleNamespace(server_info=SimpleNamespace(next_pings=pings))
        for peer, pings in (next_pings or {}).items()
    }
    manager.view = SimpleNamespace(spans=infos)
    return manager


def test_push_saves_the_crossing_back_to_the_client() -> None:
    # Both servers 10 ms from the client (20 ms round trips), nothing announced: A -> B is assumed as long as
    # the longer link, so a push saves the one crossing A -> client.
    manager = manager_with({"A": 0.02, "B": 0.02})
    assert manager.push_saving("A", "B") == pytest.approx(0.01)
    # A announces that B is 2 ms away: the relay's 20 ms become 2.
    manager = manager_with({"A": 0.02, "B": 0.02}, {"A": {"B": 0.004}})
    assert manager.push_saving("A", "B") == pytest.approx(0.018)
    # On one machine the round trips are a millisecond: pushing would save less than it costs.
    assert manager_with({"A": 0.001, "B": 0.001}).push_saving("A", "B") < routing.PUSH_MIN_SAVING
    # Not measured (or unreachable): no push.
    assert manager_with({"A": 0.02}).push_saving("A", "B") == 0.0
    assert manager_with({"A": 0.02, "B": float("inf")}).push_saving("A", "B") == 0.0


def test_a_ping_is_the_least_of_its_probes_and_stops_at_an_unreachable_one(monkeypatch) -> None:
    answers = {"new": [0.09, 0.02], "gone": [None, 0.01]}  # new: the first probe also dialled the server
    asked = []

    async def fake_ping_server(p2p, peer_id, timeout):
        asked.append(peer_id)
        rtt = answers[peer_id][asked.count(peer_id) - 1]
        return PingResult(reachable=rtt is not None, rtt=rtt)

    monkeypatch.setattr(routing, "ping_server", fake_ping_server)
    manager = manager_with({})
    assert asyncio.run(manager.ping("new")) == 0.02
    assert asyncio.run(manager.ping("gone")) == float("inf")
    assert asked == ["new"] * routing.PING_PROBES + ["gone"]


@pytest.mark.integration
def test_the_client_routes_through_the_near_replica(make_swarm) -> None:
    swarm = make_swarm()
    swarm.start_dht()
    # The far one first: a client that took the first server it read would pick it.
    far = swarm.start_server(DEMO_MODEL, "--block-indices", "0:8", name="far", link_delay=0.05)
    near = swarm.start_server(DEMO_MODEL, "--block-indices", "0:8", name="near", link_delay=0.005)
    model = AutoDistributedModelForCausalLM.from_pretrained(DEMO_MODEL, initial_peers=swarm.initial_peers)
    try:
        manager = model.manager
        route = run_sync(manager.make_route(0, 8), timeout=120)
        assert [span.peer_id for span in route] == [near.peer_id]
        # The round trips the choice rests on went through the links: no faster than the delays allow.
        assert manager.rtts[far.peer_id] >= 0.1
        assert manager.rtts[near.peer_id] >= 0.01
        assert manager.rtts[near.peer_id] < manager.rtts[far.peer_id]

        with model.inference_session(max_length=8) as session:
            model.generate(torch.tensor([[5, 6, 7]]), session=session, max_new_tokens=2, do_sample=False)
            assert [span.peer_id for span in session.route] == [near.peer_id]
    finally:
        model.close()
