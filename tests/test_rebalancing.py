"""Servers move to where the swarm is weakest: the demo model on three real block servers.

No server is pinned with --block-indices: with `--num-blocks 4` and equal throughputs each picks
its span by itself (A: 0:4 in an empty swarm, C: the empty 4:8, B: 0:4, the earliest of equal
windows), so all three may rebalance. C leaves; one of A and B moves to 4:8 as the same peer, the
monitor finds the model healthy again, generation through the swarm equals local transformers,
and nobody moves again (hysteresis).
"""

from __future__ import annotations

import asyncio
import io
import re

import pytest
import torch
from django.core.management import call_command
from hivemind import DHT
from hivemind.utils import get_dht_time
from transformers import AutoModelForCausalLM, AutoTokenizer

from swarm import AutoDistributedModelForCausalLM
from swarm.data_structures import ServerInfo, ServerState
from swarm.dht import announce_blocks, fetch_swarm
from swarm.local_swarm import SwarmProcess
from swarm.server.server import BlockServer, ServerConfig
from tests.conftest import DEMO_MODEL

pytestmark = [pytest.mark.integration, pytest.mark.django_db]

PREFIX = "demo_model-hf"
NUM_BLOCKS = 8
SERVER_ARGS = ("--num-blocks", "4", "--throughput", "10", "--balance-check-period", "1", "--update-period", "5")
MOVED = re.compile(r"Server is ONLINE again \(moved\): blocks (\d+):(\d+), peer id (\S+)")
CHECK = "Balance check:"


def _blocks(process: SwarmProcess) -> tuple[int, int]:
    line = process.wait_for_line(lambda text: "Serving blocks" in text, timeout=10)
    start, end = re.search(r"Serving blocks (\d+):(\d+)", line).groups()
    return int(start), int(end)


def _checks_after(process: SwarmProcess, line_count: int, checks: int) -> None:
    """Wait until `process` logged `checks` more balance checks after its first `line_count` lines."""
    process.wait_for_line(lambda _: sum(CHECK in text for text in process.lines[line_count:]) >= checks, 60)


def _moved(process: SwarmProcess) -> bool:
    return any(MOVED.search(text) for text in process.lines)


def _crawl(initial_peers: list[str], settings) -> str:
    settings.MONITOR_MODELS = f"{PREFIX}:{NUM_BLOCKS}::Demo model"
    out = io.StringIO()
    call_command("crawlswarm", "--initial-peers", *initial_peers, stdout=out)
    return out.getvalue()


def test_a_server_moves_to_the_blocks_left_uncovered(make_swarm, settings, client):
    swarm = make_swarm()
    try:
        _scenario(swarm, settings, client)
    finally:
        swarm.close()


def _scenario(swarm, settings, client) -> None:
    swarm.start_dht()
    a = swarm.start_server(DEMO_MODEL, *SERVER_ARGS, name="A")
    c = swarm.start_server(DEMO_MODEL, *SERVER_ARGS, name="C")
    b = swarm.start_server(DEMO_MODEL, *SERVER_ARGS, name="B")
    assert [_blocks(p) for p in (a, b, c)] == [(0, 4), (0, 4), (4, 8)], "each chose its span by itself"
    assert "healthy, 3 online, 8/8 blocks covered" in _crawl(swarm.initial_peers, settings)
    # balanced: everyone checks a few times and stays
    for process in (a, b, c):
        _checks_after(process, len(process.lines), 2)
    assert not any(_moved(p) for p in (a, b, c))

    c.stop()  # graceful: announces OFFLINE for 4:8
    # one of A and B moves; both log a balance check every second or so, which wakes this wait
    a.wait_for_line(lambda _: _moved(a) or _moved(b), timeout=120)
    mover, stayer = (a, b) if _moved(a) else (b, a)
    start, end, peer_id = MOVED.search(mover.output()).groups()
    assert (int(start), int(end)) == (4, 8)
    assert peer_id == mover.peer_id, "the server keeps its DHT/p2p identity"

    # the DHT agrees: the mover ONLINE on 4:8 under its old peer id, the other one still on 0:4
    dht = DHT(initial_peers=swarm.initial_peers, client_mode=True, start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        view = fetch_swarm(dht, PREFIX, NUM_BLOCKS)
    finally:
        dht.shutdown()
    online = {peer: (span.start, span.end) for peer, span in view.spans.items() if span.state == 2}
    assert online == {mover.peer_id: (4, 8), stayer.peer_id: (0, 4)}

    # the monitor's verdict and its model page
    output = _crawl(swarm.initial_peers, settings)
    # (C's OFFLINE announcement is listed until it expires)
    assert re.search(r"healthy, (1 offline, )?2 online, 8/8 blocks covered", output), output
    page = client.get(f"/models/{PREFIX}/").content.decode()
    assert re.search(r'class="badge healthy">healthy<', page)

    # generation through the moved server is exact
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
    local = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
    inputs = tokenizer("The function returns the value of", return_tensors="pt").input_ids
    expected = local.generate(inputs, max_new_tokens=16, do_sample=False)
    model = AutoDistributedModelForCausalLM.from_pretrained(DEMO_MODEL, initial_peers=swarm.initial_peers)
    try:
        assert model.generate(inputs, max_new_tokens=16, do_sample=False).tolist() == expected.tolist()
    finally:
        model.close()

    # no flapping: both keep checking and staying where they are
    for process in (mover, stayer):
        _checks_after(process, len(process.lines), 3)
    assert sum(bool(MOVED.search(line)) for p in (a, b) for line in p.lines) == 1


def test_a_move_that_races_with_another_backs_off():
    """The move protocol against a real DHT, in this process: a server that finds another one joining the
    blocks it just claimed returns to its old span; without a rival it loads and serves the new blocks."""
    boot = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    rival = DHT(
        initial_peers=[str(a) for a in boot.get_visible_maddrs()], start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"]
    )
    peers = [str(a) for a in boot.get_visible_maddrs()]
    config = ServerConfig(
        DEMO_MODEL, initial_peers=peers, num_blocks=4, throughput=10.0, host_maddrs=["/ip4/127.0.0.1/tcp/0"]
    )
    server = BlockServer(config)
    server.dht = DHT(initial_peers=peers, start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    me, other = server.dht.peer_id.to_base58(), rival.peer_id.to_base58()

    def spans() -> dict[str, tuple[int, int, ServerState]]:
        view = fetch_swarm(rival, PREFIX, NUM_BLOCKS)
        return {peer: (span.start, span.end, span.state) for peer, span in view.spans.items()}

    async def scenario() -> None:
        server.start, server.end, server.rates = 0, 4, {"throughput": 10.0}
        await server._announce(ServerState.ONLINE)
        joining = ServerInfo(ServerState.JOINING, 10.0, start_block=4, end_block=6)
        announce_blocks(rival, PREFIX, range(4, 6), joining, get_dht_time() + 60)
        assert await server._move(4, "test") is False
        assert (server.start, server.end, server.handler) == (0, 4, None)
        assert spans() == {me: (0, 4, ServerState.ONLINE), other: (4, 6, ServerState.JOINING)}

        announce_blocks(rival, PREFIX, range(4, 6), ServerInfo(ServerState.OFFLINE, 10.0, 4, 6), get_dht_time() + 60)
        try:
            assert await server._move(4, "test") is True
            assert (server.handler.backend.start, server.handler.backend.end) == (4, 8)
            assert spans()[me] == (4, 8, ServerState.ONLINE)
        finally:
            if server.handler is not None:
                await server._stop_handler()

    try:
        asyncio.run(scenario())
    finally:
        for dht in (server.dht, rival, boot):
            dht.shutdown()
