"""Where the shipped demo checkpoints live; the code that trains them is `manage.py makedemomodel` (`demos/`).

The two demos are 8-block causal LMs small enough to ship in the repository (at most 16 MB each), and the
draft is a 3 MB assistant for the Llama demo's speculative decoding; all three share one tokenizer, so
the site, the tests and the benchmarks run with no Hub download.
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent

# Tiny Llama (grouped-query attention); DHT prefix `demo_model-hf`.
DEMO_MODEL_PATH: Path = _HERE / "demo_model"
# Tiny Mixtral (sparse MoE, 4 experts, top-2); DHT prefix `demo_moe_model` (Mixtral appends no `-hf`).
DEMO_MOE_MODEL_PATH: Path = _HERE / "demo_moe_model"
# Tiny Llama distilled from the demo model, its assistant for speculative decoding (same tokenizer).
DEMO_DRAFT_MODEL_PATH: Path = _HERE / "demo_draft_model"
