"""What a block server stores in the DHT is exactly PROTOCOL.md's tuple, through its whole lifecycle."""

from __future__ import annotations

import time

import pytest
from hivemind import DHT

from swarm.names import MODELS_INDEX_KEY, block_uid
from tests.conftest import DEMO_MODEL

pytestmark = pytest.mark.integration

PREFIX = "demo_model-hf"
EXTRA_KEYS = {
    "start_block", "end_block", "public_name", "version", "network_rps", "forward_rps", "inference_rps",
    "adapters", "torch_dtype", "quant_type", "using_relay", "cache_tokens_left", "next_pings",
}  # fmt: skip


def announcement(dht: DHT, index: int, peer_id: str):
    found = dht.get(block_uid(PREFIX, index), latest=True)
    if found is None or peer_id not in found.value:
        return None
    return found.value[peer_id].value


def test_server_lifecycle_in_the_dht(make_swarm, swarm_env, tmp_path):
    swarm = make_swarm()
    swarm.env = {**swarm_env, "SWARM_CACHE_DIR": str(tmp_path)}  # measure throughput: JOINING lasts a while
    try:
        swarm.start_dht()
        dht = DHT(initial_peers=swarm.initial_peers, client_mode=True, start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        try:
            server = swarm.start_server(
                DEMO_MODEL,
                "--block-indices",
                "2:6",
                "--public-name",
                "<b>tester</b>",
                "--update-period",
                "5",
                wait=False,
            )
            states, peer_id = [], None
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and 2 not in states:
                if peer_id is None:
                    found = dht.get(block_uid(PREFIX, 2), latest=True)
                    peer_id = next(iter(found.value)) if found is not None and found.value else None
                value = announcement(dht, 2, peer_id) if peer_id else None
                if value is not None and (not states or states[-1] != value[0]):
                    states.append(value[0])
                time.sleep(0.05)
            assert states[:1] == [1] and states[-1] == 2, states  # JOINING, then ONLINE
            assert server.wait_until_online(30) == peer_id

            value = announcement(dht, 4, peer_id)
            assert isinstance(value, tuple) and len(value) == 3
            state, throughput, extra = value
            assert state == 2 and isinstance(throughput, float) and throughput > 0
            assert set(extra) <= EXTRA_KEYS
            assert extra["start_block"] == 2 and extra["end_block"] == 6
            assert extra["public_name"] == "<b>tester</b>" and extra["torch_dtype"] == "float32"
            assert extra["quant_type"] == "none" and extra["using_relay"] is False
            assert isinstance(extra["cache_tokens_left"], int) and extra["cache_tokens_left"] > 0
            assert isinstance(extra["version"], str)
            assert all(isinstance(extra[k], float) for k in ("inference_rps", "forward_rps", "network_rps"))
            for index in (0, 1, 6, 7):
                assert announcement(dht, index, peer_id) is None  # only its own blocks

            index = dht.get(MODELS_INDEX_KEY, latest=True)
            assert index is not None and index.value[PREFIX].value == {"num_blocks": 8, "repository": None}

            server.stop()  # SIGINT: graceful
            assert server.process.returncode is not None
            assert announcement(dht, 3, peer_id)[0] == 0  # OFFLINE
            assert "Server stopped" in server.output()
        finally:
            dht.shutdown()
    finally:
        swarm.close()
