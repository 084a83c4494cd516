"""What one server hop costs beyond compute: a real block server process and one client session.

    python bench/bench_hop.py [--steps 300] [--blocks 4]

A real `runblockserver` process serves the first blocks of the demo model; this process opens
one inference session to it and steps one token at a time from its main thread, as generate()
does. Prints `step_ms` (median round trip of one step), `compute_ms` (median of the same step
computed here, back to back) and `hop_overhead_ms`, their difference: transport, both sides'
own Python, and the server waking up for each step. Steps and local computes alternate, so
both see the same machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from transformers import AutoConfig  # noqa: E402

from swarm.checkpoint import CheckpointFiles  # noqa: E402
from swarm.client.config import ClientConfig  # noqa: E402
from swarm.client.event_loop import run_sync  # noqa: E402
from swarm.client.inference_session import ServerSession  # noqa: E402
from swarm.client.routing import RouteSpan, SequenceManager  # noqa: E402
from swarm.demo_models import DEMO_MODEL_PATH  # noqa: E402
from swarm.dht import create_dht  # noqa: E402
from swarm.local_swarm import LocalSwarm  # noqa: E402
from swarm.models.registry import dht_prefix_for, family_for, prepare_config  # noqa: E402
from swarm.server.backend import load_span  # noqa: E402


def measure(steps: int, blocks: int) -> None:
    path = str(DEMO_MODEL_PATH)
    config = prepare_config(AutoConfig.from_pretrained(path))
    family = family_for(config)
    backend = load_span(CheckpointFiles(path), family, config, 0, blocks, torch.float32, torch.device("cpu"))
    hidden = torch.randn(1, 1, config.hidden_size)
    prompt = torch.randn(1, 4, config.hidden_size)

    with tempfile.TemporaryDirectory() as cache:
        env = {"DEBUG": "1", "SWARM_CACHE_DIR": cache, "OMP_NUM_THREADS": "1"}
        with LocalSwarm([sys.executable, str(ROOT / "manage.py")], env=env) as swarm:
            swarm.start_dht()
            server = swarm.start_server(path, "--block-indices", f"0:{blocks}")
            dht = create_dht(swarm.initial_peers, client_mode=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
            try:
                p2p = run_sync(dht.replicate_p2p())
                prefix = dht_prefix_for(path, config.model_type)
                manager = SequenceManager(dht, p2p, prefix, blocks, ClientConfig(), path)
                session = ServerSession(manager, RouteSpan(server.peer_id, 0, blocks), steps + 8)
                session.open()
                session.step(prompt, "prompt", None)
                local_cache = backend.new_cache(0, blocks, 1, steps + 8)
                backend.inference_step(prompt, local_cache)
                step_times, compute_times = [], []
                for index in range(steps):
                    began = time.perf_counter()
                    session.step(hidden, str(index), None)
                    step_times.append(time.perf_counter() - began)
                    began = time.perf_counter()
                    backend.inference_step(hidden, local_cache)
                    compute_times.append(time.perf_counter() - began)
                session.finish()
                session.wait_closed(2.0)
            finally:
                dht.shutdown()
    step_ms, compute_ms = statistics.median(step_times) * 1000, statistics.median(compute_times) * 1000
    print(f"step_ms={step_ms:.3f} compute_ms={compute_ms:.3f} hop_overhead_ms={step_ms - compute_ms:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--blocks", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    measure(args.steps, args.blocks)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
