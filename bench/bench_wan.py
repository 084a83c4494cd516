"""Greedy generation over slow links: client-relayed steps vs server-to-server push, against the latency bound.

    python bench/bench_wan.py [--delay 0.01] [--tokens 32] [--rounds 5]

Two block servers (blocks 0:4 and 4:8 of the demo model) each sit behind a swarm.netsim proxy
process that delays every byte by `--delay` seconds each way, and announce only the proxy's
address. One client generates `--tokens` greedy tokens, checked equal to local transformers',
alternately with each step relayed by the client (client -> A -> client -> B -> client: 4 link
crossings per token) and with A pushing its outputs to B (client -> A -> B -> client: 3).

Prints each path's tokens/s and ms/token, its latency-bound limit (the crossings times the delay
plus the compute of a token, measured here as local transformers' ms/token in the same rounds),
`push_over_relay=` (relayed ms/token ÷ push ms/token; fewer crossings allow up to 4:3 plus compute)
and `ratio_wan_limit=` (the best path's limit ms/token ÷ its achieved ms/token: 1.0 is the bound).
Figures are medians over rounds; each round runs local, relayed and push back to back, and a ratio
to the limit is the median of the ratios within rounds. Each generation runs in an inference session
opened before and closed after its timing, as a chat's is: the prompt's step counts, freeing the
servers' caches at the end (one more round trip) does not.
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

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from swarm import AutoDistributedModelForCausalLM  # noqa: E402
from swarm.demo_models import DEMO_MODEL_PATH  # noqa: E402
from swarm.local_swarm import LocalSwarm  # noqa: E402

PROMPT = "The function returns the value of"
CROSSINGS = {"relay": 4, "push": 3}  # one-way link crossings per token with two servers


def ms_per_token(generate, inputs: torch.Tensor, tokens: int) -> tuple[float, torch.Tensor]:
    began = time.perf_counter()
    output = generate(inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return (time.perf_counter() - began) * 1000 / tokens, output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay", type=float, default=0.01, help="one-way delay of each server's link, seconds")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = str(DEMO_MODEL_PATH)

    tokenizer = AutoTokenizer.from_pretrained(path)
    inputs = tokenizer(PROMPT, return_tensors="pt").input_ids
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    _, expected = ms_per_token(local.generate, inputs, args.tokens)

    times: dict[str, list[float]] = {"local": [], "relay": [], "push": []}
    with tempfile.TemporaryDirectory() as cache:
        env = {"DEBUG": "1", "SWARM_CACHE_DIR": cache, "OMP_NUM_THREADS": "1"}
        with LocalSwarm([sys.executable, str(ROOT / "manage.py")], env=env) as swarm:
            swarm.start_dht()
            for span in ("0:4", "4:8"):
                swarm.start_server(path, "--block-indices", span, link_delay=args.delay)
            model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers)
            try:
                for mode in ("relay", "push"):  # warm-up: connections through the proxies, routes, pings
                    model.manager.config.use_server_to_server = mode == "push"
                    model.generate(inputs, max_new_tokens=4, do_sample=False)
                for index in range(args.rounds):
                    order = ("local", "relay", "push") if index % 2 == 0 else ("push", "relay", "local")
                    for mode in order:
                        if mode == "local":
                            elapsed, _ = ms_per_token(local.generate, inputs, args.tokens)
                        else:
                            model.manager.config.use_server_to_server = mode == "push"
                            # A chat's session is open already; freeing the servers' caches at its end is not
                            # a per-token cost either (it waits a round trip). The prompt's step is timed.
                            with model.inference_session(max_length=inputs.shape[1] + args.tokens) as session:
                                generate = functools.partial(model.generate, session=session)
                                elapsed, output = ms_per_token(generate, inputs, args.tokens)
                            if not torch.equal(output, expected):
                                raise SystemExit(f"{mode}: the swarm's tokens differ from local transformers'")
                        times[mode].append(elapsed)
                    print(
                        f"round {index + 1}/{args.rounds}: "
                        + " ".join(f"{mode}_ms={times[mode][-1]:.1f}" for mode in order),
                        flush=True,
                    )
                # What the client does by default (use_server_to_server=None): push where it saves enough.
                model.manager.config.use_server_to_server = None
                with model.inference_session(max_length=inputs.shape[1] + 4) as session:
                    model.generate(inputs, session=session, max_new_tokens=4, do_sample=False)
                    first, second = (span.peer_id for span in session.route)
                    default_pushes = session.push_worth_it(first, second)
                saving_ms = model.manager.push_saving(first, second) * 1000
            finally:
                model.close()

    compute_ms = statistics.median(times["local"])
    delay_ms = args.delay * 1000
    print(f"delay_ms={delay_ms:g} (one way, each server's link) compute_ms_per_token={compute_ms:.2f} (local)")
    ratios = {}
    for mode in ("relay", "push"):
        achieved = statistics.median(times[mode])
        limit = CROSSINGS[mode] * delay_ms + compute_ms
        # Within a round: the machine's slow spells last longer than a round and cancel out.
        rounds = [(CROSSINGS[mode] * delay_ms + local) / got for local, got in zip(times["local"], times[mode])]
        ratios[mode] = statistics.median(rounds)
        # What each crossing costs beyond its delay (the daemons' and the proxy's hops, waking idle processes).
        overhead = (achieved - limit) / CROSSINGS[mode]
        print(
            f"{mode}: tokens_per_s={1000 / achieved:.2f} ms_per_token={achieved:.2f} "
            f"limit_ms_per_token={limit:.2f} ratio_to_limit={ratios[mode]:.3f} "
            f"overhead_ms_per_crossing={overhead:.2f}"
        )
    best = min(("relay", "push"), key=lambda mode: statistics.median(times[mode]))
    print(f"push_over_relay={statistics.median(times['relay']) / statistics.median(times['push']):.3f}")
    default = "push" if default_pushes else "relay"
    print(f"best_path={best} default_path={default} (push saves an estimated {saving_ms:.1f} ms per step)")
    print(f"ratio_wan_limit={ratios[best]:.3f}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
