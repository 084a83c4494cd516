"""Block servers choose their blocks where the swarm is weakest, and run in other dtypes."""

from __future__ import annotations

import pytest
import torch
from hivemind import DHT

from swarm import AutoDistributedModelForCausalLM
from swarm.dht import fetch_swarm
from tests.conftest import DEMO_MODEL, start_swarm

pytestmark = pytest.mark.integration


def test_servers_fill_the_gaps_and_bfloat16_works(make_swarm):
    swarm = start_swarm(make_swarm, "0:4")
    try:
        gap_filler = swarm.start_server(DEMO_MODEL, "--num-blocks", "4", "--torch-dtype", "bfloat16")
        assert "Serving blocks 4:8" in gap_filler.output()
        whole = swarm.start_server(DEMO_MODEL)  # neither option: as many blocks as memory allows
        assert "Serving blocks 0:8" in whole.output()

        dht = DHT(initial_peers=swarm.initial_peers, client_mode=True, start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        try:
            view = fetch_swarm(dht, "demo_model-hf", 8)
            dtypes = {peer: span.server_info.torch_dtype for peer, span in view.spans.items()}
            assert dtypes[gap_filler.peer_id] == "bfloat16" and dtypes[whole.peer_id] == "float32"
        finally:
            dht.shutdown()

        whole.stop()
        first = swarm.processes[1]  # the float32 server of blocks 0:4
        model = AutoDistributedModelForCausalLM.from_pretrained(DEMO_MODEL, initial_peers=swarm.initial_peers)
        try:
            model.manager.config.routing_refresh = 0.0
            with model.inference_session(max_length=32) as session:
                output = model.generate(
                    torch.tensor([[1, 60, 61, 62]]), max_new_tokens=8, min_new_tokens=8, session=session
                )
                route = [(s.span.peer_id, s.span.start, s.span.end) for s in session.sessions]
            assert output.shape == (1, 12)
            # Through the float32 server and then the bfloat16 one: the only route once `whole` is gone.
            assert route == [(first.peer_id, 0, 4), (gap_filler.peer_id, 4, 8)]
        finally:
            model.close()
    finally:
        swarm.close()
