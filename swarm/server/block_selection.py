"""Which blocks a new server should host: the window where the swarm is weakest."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence

import torch

from swarm.data_structures import ServerState
from swarm.dht import SwarmView

# A relayed server counts for this share of its throughput when servers choose blocks: each of its steps
# crosses the relay too, and a relay's circuits are limited and reset, so its blocks need direct servers
# more than others do (Petals discounts relayed servers when it rebalances, too).
RELAYED_THROUGHPUT_SHARE = 0.2


def block_throughputs(view: SwarmView, *, exclude: str | None = None) -> list[float]:
    """Summed announced throughput of joining and online servers, per block (without peer `exclude`);
    relayed servers count for RELAYED_THROUGHPUT_SHARE of theirs."""
    totals = [0.0] * view.num_blocks
    for peer_id, span in view.spans.items():
        if peer_id != exclude and span.state in (ServerState.JOINING, ServerState.ONLINE):
            share = RELAYED_THROUGHPUT_SHARE if span.server_info.using_relay else 1.0
            for index in range(span.start, min(span.end, view.num_blocks)):
                totals[index] += share * span.server_info.throughput
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


@dataclasses.dataclass(frozen=True)
class BalanceDecision:
    """The outcome of a balance check: the start to move to (None: stay) and why, for the log."""

    start: int | None
    reason: str
    weakest_now: float = 0.0  # the swarm's least per-block throughput with this server where it is
    weakest_after: float = 0.0  # ... and after the move (equal to weakest_now when staying)

    @property
    def move(self) -> bool:
        return self.start is not None


def choose_rebalance(
    others: Sequence[float], start: int, end: int, throughput: float, balance_quality: float
) -> BalanceDecision:
    """Whether a server holding [start, end) with `throughput` should move its span, and where to.

    `others` is every other joining or online server's throughput, per block. Like Petals, a move
    must lift the swarm's weakest block: past a factor 1 / `balance_quality` when every block is
    served, or by serving blocks nobody serves while leaving none uncovered. Two rules keep servers
    from flapping: a move never uncovers a block of a fully served swarm, and the blocks a server
    leaves must keep more throughput than the blocks it gains had before it came. A move back would
    then fail the same test, and each move raises the swarm's weakest block, so moves cannot cycle.
    `balance_quality` <= 0 disables moving.
    """
    length, num_blocks = end - start, len(others)
    if balance_quality <= 0:
        return BalanceDecision(None, "rebalancing is disabled")
    if not 0 <= start < end <= num_blocks:
        return BalanceDecision(None, f"span {start}:{end} is not within the model's {num_blocks} blocks")
    now = _with_span(others, start, end, throughput)
    weakest_now = min(now)
    stay = functools.partial(BalanceDecision, None, weakest_now=weakest_now, weakest_after=weakest_now)
    if throughput <= 0:
        return stay("this server announces no throughput")
    best = choose_best_start(others, length)
    if _window_key(others, best, length) >= _window_key(others, start, length):
        return stay("this span is already the weakest place")
    after = _with_span(others, best, best + length, throughput)
    weakest_after = min(after)
    left = [i for i in range(start, end) if not best <= i < best + length]
    gained = [i for i in range(best, best + length) if not start <= i < end]
    if weakest_now > 0 and min(after[i] for i in left) <= 0:
        return stay(f"moving to {best}:{best + length} would uncover blocks only this server holds")
    if min(after[i] for i in left) <= min(now[i] for i in gained):
        return stay(f"blocks {_ranges(left)} would be left no stronger than blocks {_ranges(gained)} are now")
    holes_now, holes_after = now.count(0.0), after.count(0.0)
    if holes_after < holes_now:
        reason = f"would serve blocks nobody serves ({holes_now - holes_after} of them)"
    elif holes_now == 0 and weakest_after * balance_quality > weakest_now:
        reason = f"would lift the weakest block's throughput from {weakest_now:.4g} to {weakest_after:.4g}"
    else:
        quality = weakest_now / weakest_after if weakest_after > 0 else 1.0
        return stay(f"the swarm is balanced enough ({quality:.0%} of what moving would give)")
    return BalanceDecision(best, reason, weakest_now, weakest_after)


def _with_span(others: Sequence[float], start: int, end: int, throughput: float) -> list[float]:
    return [value + throughput if start <= index < end else value for index, value in enumerate(others)]


def _window_key(throughputs: Sequence[float], start: int, length: int) -> tuple[float, float]:
    """How much a window needs help: lower is needier (the order `choose_best_start` minimizes)."""
    window = throughputs[start : start + length]
    return min(window), sum(window)


def _ranges(indices: list[int]) -> str:
    return f"{indices[0]}:{indices[-1] + 1}" if indices == list(range(indices[0], indices[-1] + 1)) else str(indices)


def blocks_that_fit(block_bytes: int, cache_bytes: int, device: torch.device, total_blocks: int) -> int:
    """How many blocks fit in the device's free memory next to the attention cache (at least one)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    usable = int(free * 0.8) - cache_bytes
    return max(1, min(total_blocks, usable // max(block_bytes, 1)))
