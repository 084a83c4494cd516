"""Every bench script runs to the end on a small setting and prints the figures its issue names.

The figures themselves are not asserted (machines are noisy; the scripts print ratios measured
in one run); this keeps the scripts from rotting between the times someone runs them.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NUMBER = r"-?\d+(\.\d+)?"

BENCHES = {
    "bench_quant.py": (["--steps", "2"], ["demo_ratio_nf4", "llama3_8b_ratio_int8", "step_ratio_nf4"]),
    "bench_transport.py": (["--rounds", "20"], ["stream_rtt_ms", "hivemind_stream_rtt_ms", "unary_rtt_ms"]),
    "bench_hop.py": (["--steps", "5"], ["step_ms", "compute_ms", "hop_overhead_ms"]),
    "bench_server_load.py": (
        ["--steps", "4", "--sessions", "1", "4", "--rounds", "2"],
        ["server_ratio_4", "steps_per_batch_4", "lone_session_ratio"],
    ),
    "bench_generate.py": (["--tokens", "4", "--rounds", "1"], ["ratio_1server", "ratio_2servers"]),
    "bench_train.py": (["--rounds", "1", "--steps", "3", "--tokens", "16"], ["ratio_train_step"]),
    "bench_wan.py": (
        ["--speculative", "--tokens", "8", "--rounds", "1"],
        [
            "ratio_wan_limit",
            "push_over_relay",
            "floor_ms_per_token",
            "floor_ratio",
            "speculative_speedup",
            "accepted_per_step",
            "tokens_per_round_trip",
            "speculative_speedup_no_delay",
            "exact_outputs",
        ],
    ),
    "bench_relay.py": (["--tokens", "4", "--rounds", "1"], ["relay_over_direct"]),
    "bench_crawl.py": (
        ["--servers", "50", "--blocks", "8", "--repeats", "1"],
        ["crawl_seconds_50", "naive_over_crawl", "status_page_ms_50"],
    ),
    # Tiny shapes: the Llama and Mixtral checkpoints, servers and every kind of figure, in seconds of compute.
    "bench_real_shape.py": (
        ["--hidden", "256", "--intermediate", "512", "--quick", "--modes", "float32", "nf4", "--long-dtype", "float32"],
        [
            "ratio_1server",
            "server_ratio_16_short",
            "server_ratio_16_long",
            "steps_per_batch_16_long",
            "memory_overhead_pct_float32",
            "memory_overhead_pct_nf4",
            "load_gb_per_s",
            "ratio_1server_mixtral",
        ],
    ),
    "bench_stream.py": (
        ["--tokens", "4", "--rounds", "1", "--sockets", "2", "--chat-tokens", "4"],
        ["ws_to_direct_speed_ratio", "aggregate_to_single_socket_ratio"],
    ),
}


@pytest.mark.integration
@pytest.mark.parametrize("script", sorted(BENCHES))
def test_bench_runs_and_prints_its_figures(script: str) -> None:
    args, figures = BENCHES[script]
    env = {**os.environ, "DEBUG": "1", "PYTHONPATH": str(ROOT)}
    # Its own process group: on a timeout the bench's servers and daemons go down with it.
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / script), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 0, output[-3000:]
    for figure in figures:
        printed = re.search(rf"(^|\s){figure}={NUMBER}(\s|$)", output, re.MULTILINE)
        assert printed, f"{figure}= missing:\n{output[-3000:]}"
