"""Greedy generation through a relayed server vs the same server dialed directly.

    python bench/bench_relay.py [--tokens 64] [--rounds 5]

One block server (all 8 blocks of the demo model) serves through the bootstrap peer's libp2p relay
(`--relay always`: it announces only `<bootstrap>/p2p-circuit`), on loopback, with no delay. Two
clients generate `--tokens` greedy tokens each round, checked equal to local transformers': one
reaches the server the way every client does, through the relay; the other first connects to the
server's own listening address, so its streams go direct.

Prints each path's ms/token (medians over rounds), how each client is connected to the server
(`relay` when all its connections go through a circuit) and `relay_over_direct=` (the median of the
per-round ratios of relayed to direct ms/token: what the relay's extra hop costs, 1.0 being free).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hivemind.p2p import PeerID  # noqa: E402
from hivemind.utils.multiaddr import Multiaddr  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from swarm import AutoDistributedModelForCausalLM  # noqa: E402
from swarm.client.event_loop import run_sync  # noqa: E402
from swarm.demo_models import DEMO_MODEL_PATH  # noqa: E402
from swarm.local_swarm import LocalSwarm, free_port  # noqa: E402
from swarm.relays import connection_addresses  # noqa: E402

PROMPT = "The function returns the value of"


def connection_kind(model, peer_id: str) -> str:
    """relay, direct or both: how the client's p2pd is connected to the server now."""
    addrs = run_sync(connection_addresses(model.manager.p2p, peer_id), timeout=10)
    relayed = {"/p2p-circuit" in addr for addr in addrs}
    return {frozenset({True}): "relay", frozenset({False}): "direct"}.get(
        frozenset(relayed), "both" if addrs else "none"
    )


def ms_per_token(model, inputs: torch.Tensor, tokens: int) -> tuple[float, torch.Tensor]:
    with model.inference_session(max_length=inputs.shape[1] + tokens) as session:
        generate = functools.partial(model.generate, session=session)
        began = time.perf_counter()
        output = generate(inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        return (time.perf_counter() - began) * 1000 / tokens, output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = str(DEMO_MODEL_PATH)

    tokenizer = AutoTokenizer.from_pretrained(path)
    inputs = tokenizer(PROMPT, return_tensors="pt").input_ids
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    expected = local.generate(inputs, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)

    times: dict[str, list[float]] = {"relay": [], "direct": []}
    with tempfile.TemporaryDirectory() as cache:
        env = {"DEBUG": "1", "SWARM_CACHE_DIR": cache, "OMP_NUM_THREADS": "1"}
        with LocalSwarm([sys.executable, str(ROOT / "manage.py")], env=env) as swarm:
            peers = swarm.start_dht()
            port = free_port()
            server = swarm.start_server(path, "--relay", "always", "--host-maddrs", f"/ip4/127.0.0.1/tcp/{port}")
            clients = {
                mode: AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=peers) for mode in times
            }
            try:
                own_address = Multiaddr(f"/ip4/127.0.0.1/tcp/{port}")
                connect = clients["direct"].manager.p2p._client.connect(
                    PeerID.from_base58(server.peer_id), [own_address]
                )
                run_sync(connect, timeout=30)
                for model in clients.values():  # warm-up: routes, pings, connections
                    model.generate(inputs, max_new_tokens=4, do_sample=False)
                for index in range(args.rounds):
                    order = ("relay", "direct") if index % 2 == 0 else ("direct", "relay")
                    for mode in order:
                        elapsed, output = ms_per_token(clients[mode], inputs, args.tokens)
                        if not torch.equal(output, expected):
                            raise SystemExit(f"{mode}: the swarm's tokens differ from local transformers'")
                        times[mode].append(elapsed)
                    print(
                        f"round {index + 1}/{args.rounds}: "
                        + " ".join(f"{mode}_ms={times[mode][-1]:.2f}" for mode in order),
                        flush=True,
                    )
                kinds = {mode: connection_kind(model, server.peer_id) for mode, model in clients.items()}
            finally:
                for model in clients.values():
                    model.close()

    for mode in times:
        median = statistics.median(times[mode])
        print(f"{mode}: connection={kinds[mode]} ms_per_token={median:.2f} tokens_per_s={1000 / median:.1f}")
    ratios = [relayed / direct for relayed, direct in zip(times["relay"], times["direct"])]
    print(f"relay_over_direct={statistics.median(ratios):.3f}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
