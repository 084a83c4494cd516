"""Which blocks a new server should host: the window where the swarm is weakest."""

from __future__ import annotations

import os

import torch

from swarm.data_structures import ServerState
from swarm.dht import SwarmView


def block_throughputs(view: SwarmView) -> list[float]:
    """Summed announced throughput of joining and online servers, per block."""
    totals = [0.0] * view.num_blocks
    for span in view.spans.values():
        if span.state in (ServerState.JOINING, ServerState.ONLINE):
            for index in range(span.start, min(span.end, view.num_blocks)):
                totals[index] += span.server_info.throughput
    return totals


def choose_best_start(throughputs: list[float], num_blocks: int) -> int:
    """Start of the window of `num_blocks` with the least total throughput (earliest on ties).

    Sorting by the weakest block first makes a window that closes a gap win over one that
    merely has a low sum.
    """
    num_blocks = min(num_blocks, len(throughputs))
    windows = range(len(throughputs) - num_blocks + 1)
    return min(
        windows,
        key=lambda start: (
            min(throughputs[start : start + num_blocks]),
            sum(throughputs[start : start + num_blocks]),
            start,
        ),
    )


def blocks_that_fit(block_bytes: int, cache_bytes: int, device: torch.device, total_blocks: int) -> int:
    """How many blocks fit in the device's free memory next to the attention cache (at least one)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    usable = int(free * 0.8) - cache_bytes
    return max(1, min(total_blocks, usable // max(block_bytes, 1)))
