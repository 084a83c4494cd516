"""How fast this server is: measured once per model/device/dtype and cached on disk.

- inference_rps: single-token steps per second through one block (with a KV cache),
- forward_rps: tokens per second through one block for long sequences,
- network_rps: tokens per second the link can carry (from the configured bandwidth),
- throughput: the minimum, as announced (PROTOCOL.md: requests per second for one block).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

from swarm.server.backend import SpanBackend

logger = logging.getLogger(__name__)

DEFAULT_BANDWIDTH_MBPS = 100.0


def cache_path() -> Path:
    root = Path(os.environ.get("SWARM_CACHE_DIR", Path.home() / ".cache" / "swarm"))
    return root / "throughput.json"


def measure_throughput(backend: SpanBackend, *, cache_key: str, bandwidth_mbps: float = DEFAULT_BANDWIDTH_MBPS) -> dict:
    path = cache_path()
    cached = _read_cache(path)
    if cache_key in cached:
        logger.info("Throughput for %s from cache %s", cache_key, path)
        return cached[cache_key]
    logger.info("Measuring throughput (once; cached in %s)", path)
    num_blocks = backend.end - backend.start
    inference_rps = _measure_inference(backend) * num_blocks
    forward_rps = _measure_forward(backend) * num_blocks
    # A hidden state of one token travels as hidden_size 16-bit values (in and out).
    network_rps = bandwidth_mbps * 1e6 / (backend.hidden_size * 16 * 2)
    result = {
        "inference_rps": inference_rps,
        "forward_rps": forward_rps,
        "network_rps": network_rps,
        "throughput": min(inference_rps, forward_rps, network_rps),
    }
    cached[cache_key] = result
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cached, indent=2))
    except OSError as e:
        logger.warning("Could not cache the throughput in %s: %s", path, e)
    logger.info("Throughput per block: %s", ", ".join(f"{k}={v:.1f}" for k, v in result.items()))
    return result


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure_inference(backend: SpanBackend, steps: int = 16) -> float:
    """Single-token steps per second through the whole span."""
    cache = backend.new_cache(backend.start, backend.end - backend.start, 1, steps + 1)
    hidden = torch.randn(1, 1, backend.hidden_size)
    backend.inference_step(hidden, cache)  # warm-up
    _synchronize(backend.device)
    began = time.perf_counter()
    for _ in range(steps):
        backend.inference_step(hidden, cache)
    _synchronize(backend.device)
    return steps / (time.perf_counter() - began)


def _measure_forward(backend: SpanBackend, tokens: int = 256, repeats: int = 2) -> float:
    hidden = torch.randn(1, tokens, backend.hidden_size)
    backend.forward(hidden, backend.start, backend.end)  # warm-up
    _synchronize(backend.device)
    began = time.perf_counter()
    for _ in range(repeats):
        backend.forward(hidden, backend.start, backend.end)
    _synchronize(backend.device)
    return tokens * repeats / (time.perf_counter() - began)
