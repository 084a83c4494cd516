"""Memory per block, and one-token step time, of the quant types a server can serve with (`--quant-type`).

    python bench/bench_quant.py [--steps 20] [--measure-8b]

Prints, for none / int8 / nf4:
- `demo_bytes_per_block_<mode>`: bytes one demo-model block really holds once built and quantized
  (float32, the CPU default), next to `demo_estimate_<mode>` (what servers count when choosing how
  many blocks fit) and `demo_ratio_<mode>`: bytes over the unquantized block's;
- `llama3_8b_bytes_per_block_<mode>` and `llama3_8b_ratio_<mode>`: the same for a Llama-3-8B-shaped
  block in bfloat16 (the GPU default), computed from its shapes; `--measure-8b` also builds one with
  random weights (about 1.3 GB of RAM and some seconds) and prints `llama3_8b_measured_<mode>`;
- `llama3_8b_blocks_per_24gib_<mode>`: how many such blocks a 24 GiB GPU holds (weights only);
- `step_ms_<mode>` and `step_ratio_<mode>`: median one-token inference step through the 8 demo blocks
  on this CPU, and its ratio to none (quantized matmuls dequantize on the fly: slower on CPUs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from swarm.checkpoint import CheckpointFiles  # noqa: E402
from swarm.demo_models import DEMO_MODEL_PATH  # noqa: E402
from swarm.models.registry import family_for, prepare_config  # noqa: E402
from swarm.server.backend import SpanBackend, load_span  # noqa: E402
from swarm.server.quantization import block_bytes, measured_bytes  # noqa: E402

MODES = ("none", "int8", "nf4")
CPU = torch.device("cpu")
GIB = 1 << 30


def llama3_8b_config():
    return AutoConfig.for_model(
        "llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_hidden_layers=32,
        vocab_size=128256,
    )


def step_ms(backend: SpanBackend, steps: int) -> float:
    cache = backend.new_cache(backend.start, backend.end - backend.start, 1, steps + 8)
    hidden = torch.randn(1, 1, backend.hidden_size)
    backend.inference_step(torch.randn(1, 4, backend.hidden_size), cache)  # warm-up and a short prefix
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        backend.inference_step(hidden, cache)
        times.append(time.perf_counter() - began)
    return 1000 * statistics.median(times)


def random_block_bytes(config, quant_type: str) -> int:
    family = family_for(config)
    with torch.device("meta"):
        shapes = {name: (p.shape, p.dtype) for name, p in family.make_block(config, 0).state_dict().items()}
    weights = {name: torch.randn(shape, dtype=torch.bfloat16) * 0.02 for name, (shape, _) in shapes.items()}
    backend = SpanBackend(family, config, 0, 1, [weights], torch.bfloat16, CPU, quant_type)
    return measured_bytes(backend.blocks[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed one-token steps per mode")
    parser.add_argument("--measure-8b", action="store_true", help="also build a random Llama-3-8B-shaped block")
    args = parser.parse_args()

    config = prepare_config(AutoConfig.from_pretrained(DEMO_MODEL_PATH))
    family = family_for(config)
    files = CheckpointFiles(str(DEMO_MODEL_PATH))
    print(f"torch {torch.__version__}, demo model {config.num_hidden_layers} blocks, hidden {config.hidden_size}")
    demo, times = {}, {}
    for mode in MODES:
        backend = load_span(files, family, config, 0, config.num_hidden_layers, torch.float32, CPU, quant_type=mode)
        times[mode] = step_ms(backend, args.steps)
        demo[mode] = measured_bytes(backend.blocks[0])
        print(
            f"demo_bytes_per_block_{mode}={demo[mode]} demo_estimate_{mode}={block_bytes(config, torch.float32, mode)} "
            f"demo_ratio_{mode}={demo[mode] / demo['none']:.3f}"
        )
    big = llama3_8b_config()
    sizes = {mode: block_bytes(big, torch.bfloat16, mode) for mode in MODES}
    for mode in MODES:
        print(
            f"llama3_8b_bytes_per_block_{mode}={sizes[mode]} llama3_8b_ratio_{mode}={sizes[mode] / sizes['none']:.3f} "
            f"llama3_8b_blocks_per_24gib_{mode}={24 * GIB // sizes[mode]}"
        )
        if args.measure_8b:
            print(f"llama3_8b_measured_{mode}={random_block_bytes(big, mode)}")
    for mode in MODES:
        print(f"step_ms_{mode}={times[mode]:.2f} step_ratio_{mode}={times[mode] / times['none']:.2f}")


if __name__ == "__main__":
    main()
