"""Choosing which blocks a new server hosts: the weakest window of the swarm."""

from __future__ import annotations

import pytest

from swarm.data_structures import RemoteSpanInfo, ServerInfo, ServerState
from swarm.dht import SwarmView
from swarm.server.block_selection import block_throughputs, choose_best_start


def view(num_blocks: int, *spans: tuple[str, int, int, ServerState, float]) -> SwarmView:
    return SwarmView(
        prefix="Tiny-hf",
        num_blocks=num_blocks,
        spans={peer: RemoteSpanInfo(peer, s, e, ServerInfo(state, tp)) for peer, s, e, state, tp in spans},
    )


def test_block_throughputs_counts_joining_and_online_only() -> None:
    v = view(
        6,
        ("a", 0, 3, ServerState.ONLINE, 10.0),
        ("b", 2, 5, ServerState.JOINING, 5.0),
        ("c", 0, 6, ServerState.OFFLINE, 100.0),
        ("d", 4, 6, ServerState.ONLINE, 1.5),
    )
    assert block_throughputs(v) == [10.0, 10.0, 15.0, 5.0, 6.5, 1.5]


def test_block_throughputs_empty_swarm() -> None:
    assert block_throughputs(view(4)) == [0.0, 0.0, 0.0, 0.0]


def test_block_throughputs_clips_spans_to_the_model() -> None:
    v = view(3, ("a", 1, 5, ServerState.ONLINE, 2.0))
    assert block_throughputs(v) == [0.0, 2.0, 2.0]


def test_choose_best_start_picks_the_uncovered_gap() -> None:
    assert choose_best_start([5.0, 5.0, 0.0, 0.0, 5.0, 5.0], 2) == 2
    assert choose_best_start([5.0, 5.0, 5.0, 5.0, 0.0, 0.0], 2) == 4


def test_gap_beats_a_lower_sum_without_gap() -> None:
    """A window that closes a hole wins over one that merely has less total throughput."""
    throughputs = [1.0, 1.0, 1.0, 100.0, 0.0, 100.0]
    # windows of 3: [0:3] sum 3 (no hole) vs [2:5]/[3:6]/[4:...] containing the hole at 4
    start = choose_best_start(throughputs, 3)
    assert start <= 4 < start + 3
    assert start == 2  # among hole-covering windows, the smallest sum (1+100+0)


def test_choose_best_start_from_a_swarm_view() -> None:
    v = view(8, ("a", 0, 4, ServerState.ONLINE, 3.0), ("b", 6, 8, ServerState.ONLINE, 3.0))
    assert choose_best_start(block_throughputs(v), 2) == 4
    assert choose_best_start(block_throughputs(v), 3) == 3  # [3,4,5]: covers the hole, smallest sum


def test_earliest_on_ties() -> None:
    assert choose_best_start([0.0] * 8, 3) == 0
    assert choose_best_start([2.0, 1.0, 1.0, 2.0, 1.0, 1.0], 2) == 1


@pytest.mark.parametrize("size", [6, 7, 100])
def test_window_clipped_to_model_size(size: int) -> None:
    assert choose_best_start([1.0, 0.0, 3.0, 0.0, 2.0, 2.0], size) == 0


def test_single_block_window() -> None:
    assert choose_best_start([3.0, 2.0, 0.5, 0.5, 9.0], 1) == 2
