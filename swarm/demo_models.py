"""Where the shipped demo checkpoints live; the code that trains them is `manage.py makedemomodel`.

Both are 8-block causal LMs small enough to ship in the repository (at most 16 MB each) and
share one tokenizer, so the site, the tests and the benchmarks run with no Hub download.
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent

# Tiny Llama (grouped-query attention); DHT prefix `demo_model-hf`.
DEMO_MODEL_PATH: Path = _HERE / "demo_model"
# Tiny Mixtral (sparse MoE, 4 experts, top-2); DHT prefix `demo_moe_model` (Mixtral appends no `-hf`).
DEMO_MOE_MODEL_PATH: Path = _HERE / "demo_moe_model"
