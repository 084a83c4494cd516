"""Tokens/s of greedy generation: local transformers vs the swarm with 1 and 2 servers, in one run.

    python bench/bench_generate.py [--model PATH] [--tokens 64] [--rounds 15]

Any family's checkpoint folder (with its tokenizer) works; the default is the Llama demo model.

Prints tokens/s for each setup, `ratio_1server=<x>` and `ratio_2servers=<x>` (swarm / local), and
each server's peak RSS next to the weight size of its blocks. Every figure comes from this one
run: each round times local and swarm generation back to back (in alternating order), and a
ratio is the median over rounds of swarm / local within a round, so that the slow spells of a
shared machine, which last longer than a round, cancel out.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from swarm import AutoDistributedModelForCausalLM  # noqa: E402
from swarm.demo_models import DEMO_MODEL_PATH  # noqa: E402
from swarm.local_swarm import LocalSwarm  # noqa: E402
from swarm.models.registry import bytes_per_block, family_for  # noqa: E402

PROMPT = "The function returns the value of"


def tokens_per_second(generate, inputs: torch.Tensor, tokens: int) -> float:
    began = time.perf_counter()
    output = generate(inputs, max_new_tokens=tokens, min_new_tokens=tokens)
    return (output.shape[1] - inputs.shape[1]) / (time.perf_counter() - began)


def compare(
    local_generate, swarm_generate, inputs: torch.Tensor, tokens: int, rounds: int
) -> tuple[float, float, float]:
    """Median tokens/s of each, and the median of their ratio within a round."""
    for generate in (local_generate, swarm_generate):
        generate(inputs, max_new_tokens=4, min_new_tokens=4)  # warm-up
    local, swarm, ratios = [], [], []
    for index in range(rounds):
        if index % 2:
            swarm.append(tokens_per_second(swarm_generate, inputs, tokens))
            local.append(tokens_per_second(local_generate, inputs, tokens))
        else:
            local.append(tokens_per_second(local_generate, inputs, tokens))
            swarm.append(tokens_per_second(swarm_generate, inputs, tokens))
        ratios.append(swarm[-1] / local[-1])
    return statistics.median(local), statistics.median(swarm), statistics.median(ratios)


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory of a server process and its children (DHT, p2pd are separate)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def baseline_rss_mb() -> float:
    """Peak RSS of a process that only imports what a server imports: the floor under every server."""
    code = (
        "import torch, transformers, hivemind, django; from swarm.server import server; import swarm.models.llama; "
        "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEMO_MODEL_PATH))
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    inputs = tokenizer(PROMPT, return_tensors="pt").input_ids

    local = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    local_generate = functools.partial(local.generate, do_sample=False)

    config = AutoConfig.from_pretrained(args.model)
    block_mb = bytes_per_block(config, torch.float32) / 2**20
    blocks = family_for(config).num_blocks(config)
    half = blocks // 2
    ratios = {}
    with tempfile.TemporaryDirectory() as cache:
        env = {"DEBUG": "1", "SWARM_CACHE_DIR": cache, "OMP_NUM_THREADS": "1"}
        for name, spans in (("1server", [f"0:{blocks}"]), ("2servers", [f"0:{half}", f"{half}:{blocks}"])):
            with LocalSwarm([sys.executable, str(ROOT / "manage.py")], env=env) as swarm:
                swarm.start_dht()
                servers = [swarm.start_server(args.model, "--block-indices", span) for span in spans]
                model = AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=swarm.initial_peers)
                try:
                    swarm_generate = functools.partial(model.generate, do_sample=False)
                    local_tps, swarm_tps, ratios[name] = compare(
                        local_generate, swarm_generate, inputs, args.tokens, args.rounds
                    )
                finally:
                    model.close()
                print(f"{name}: local_tokens_per_s={local_tps:.1f} swarm_tokens_per_s={swarm_tps:.1f}")
                for span, server in zip(spans, servers):
                    start, end = map(int, span.split(":"))
                    print(
                        f"  server {span}: peak_rss_mb={peak_rss_mb(server.pid):.0f} "
                        f"blocks_weights_mb={(end - start) * block_mb:.1f}"
                    )
    print(f"baseline_process_rss_mb={baseline_rss_mb():.0f}  (python + torch + transformers + hivemind, no model)")
    print(f"ratio_1server={ratios['1server']:.3f}")
    print(f"ratio_2servers={ratios['2servers']:.3f}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
