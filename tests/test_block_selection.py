"""Choosing which blocks a new server hosts (the weakest window of the swarm), and when a server moves."""

from __future__ import annotations

import pytest

from swarm.data_structures import RemoteSpanInfo, ServerInfo, ServerState
from swarm.dht import SwarmView
from swarm.server.block_selection import (
    RELAYED_THROUGHPUT_SHARE,
    block_throughputs,
    choose_best_start,
    choose_rebalance,
)


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


def test_relayed_servers_count_for_a_share_of_their_throughput() -> None:
    """A new server prefers the blocks that only relayed servers hold over those direct servers hold."""
    direct = RemoteSpanInfo("direct", 0, 2, ServerInfo(ServerState.ONLINE, 10.0, using_relay=False))
    relayed = RemoteSpanInfo("relayed", 2, 4, ServerInfo(ServerState.ONLINE, 10.0, using_relay=True))
    v = SwarmView(prefix="Tiny-hf", num_blocks=4, spans={"direct": direct, "relayed": relayed})
    share = 10.0 * RELAYED_THROUGHPUT_SHARE
    assert block_throughputs(v) == [10.0, 10.0, share, share]
    assert choose_best_start(block_throughputs(v), 2) == 2


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


# ----- rebalancing: whether a serving server moves, and where -----

T = 10.0


def test_block_throughputs_without_one_server() -> None:
    v = view(4, ("me", 0, 2, ServerState.ONLINE, 3.0), ("b", 1, 4, ServerState.JOINING, 1.0))
    assert block_throughputs(v, exclude="me") == [0.0, 1.0, 1.0, 1.0]
    assert block_throughputs(v, exclude="nobody") == [3.0, 4.0, 1.0, 1.0]


def test_one_of_two_servers_on_the_same_span_moves_to_the_gap() -> None:
    """Two servers on 0:4, nobody on 4:8 (its server left): the one checking moves there."""
    v = view(8, ("me", 0, 4, ServerState.ONLINE, T), ("b", 0, 4, ServerState.ONLINE, T))
    decision = choose_rebalance(block_throughputs(v, exclude="me"), 0, 4, T, 0.75)
    assert decision.move and decision.start == 4
    assert (decision.weakest_now, decision.weakest_after) == (0.0, T)


def test_the_other_one_stays_once_the_first_is_joining_the_gap() -> None:
    """No flapping: the second server sees the first one's JOINING and would now uncover 0:4 by leaving."""
    v = view(8, ("me", 0, 4, ServerState.ONLINE, T), ("b", 4, 8, ServerState.JOINING, T))
    decision = choose_rebalance(block_throughputs(v, exclude="me"), 0, 4, T, 0.75)
    assert not decision.move and decision.start is None


def test_a_balanced_swarm_stays_put() -> None:
    # two on 0:4, one on 4:8: the lone server on 4:8 would uncover it; the pair is where the earliest tie is
    spans = [("a", 0, 4, T), ("b", 0, 4, T), ("c", 4, 8, T)]
    v = view(8, *((p, s, e, ServerState.ONLINE, tp) for p, s, e, tp in spans))
    for peer, start, end, tp in spans:
        assert not choose_rebalance(block_throughputs(v, exclude=peer), start, end, tp, 0.75).move, peer


def test_a_move_back_is_never_worth_it() -> None:
    """After any move the rule chose, the same server looking again does not move (back or elsewhere)."""
    cases = [
        ([T, T, T, T, 0, 0, 0, 0], 0, 4, T),
        ([3, 3, 3, 3, 1, 1, 1, 1], 0, 4, 4.0),
        ([3, 3, 3, 3, 1, 1, 1, 1], 0, 4, 2.0),
        ([5, 5, 0, 0, 0, 0, 1, 1], 0, 2, 7.0),
        ([2, 9, 9, 9, 9, 9, 9, 0.5], 3, 6, 1.0),
    ]
    for others, start, end, tp in cases:
        first = choose_rebalance(others, start, end, tp, 0.75)
        assert first.move, (others, start, end)
        again = choose_rebalance(others, first.start, first.start + end - start, tp, 0.75)
        assert not again.move, (others, first, again)


def test_balance_quality_is_the_hysteresis() -> None:
    """Every block served: move only if the weakest block gains past a factor 1 / balance_quality."""
    others = [4.0, 4.0, 4.0, 4.0, 3.0, 3.0, 3.0, 3.0]  # with me (1.0) on 0:4 the weakest block has 3.0
    # moving to 4:8 makes the weakest block 4.0: a gain of 4/3, i.e. quality 75%
    assert choose_rebalance(others, 0, 4, 1.0, 0.70).move is False  # 75% >= 70%: balanced enough
    assert choose_rebalance(others, 0, 4, 1.0, 0.80).start == 4  # 75% < 80%: worth moving
    assert choose_rebalance(others, 0, 4, 1.0, 1.0).start == 4


def test_a_small_gain_does_not_move_a_server() -> None:
    others = [10.0, 10.0, 9.9, 9.9]  # with me (1.0) on 0:2 the weakest block has 9.9; on 2:4 it would have 10.0
    decision = choose_rebalance(others, 0, 2, 1.0, 0.75)
    assert not decision.move and "balanced enough" in decision.reason


def test_never_uncovers_a_block_of_a_fully_served_swarm() -> None:
    # me (T) on 0:4 hold blocks 0 and 3 alone; 2:6 is the window others serve least, but leaving 0 uncovers it
    decision = choose_rebalance([0.0, 9.0, 9.0, 0.0, 1.0, 1.0], 0, 4, T, 1.0)
    assert not decision.move and "uncover" in decision.reason


def test_does_not_trade_one_gap_for_another() -> None:
    """Not fully served: leaving block 0 empty to fill 2:4 would close more gaps than it opens, but the
    blocks left behind would be no stronger than the ones gained were: the next check would swing back."""
    decision = choose_rebalance([0.0, 5.0, 0.0, 0.0], 0, 2, T, 1.0)
    assert not decision.move and "no stronger" in decision.reason
    assert choose_rebalance([0.5, 5.0, 0.0, 0.0], 0, 2, T, 1.0).start == 2  # block 0 stays served: fine


def test_covering_more_of_a_partly_served_model_is_a_move() -> None:
    """Two servers on 0:2 of 8 blocks, nothing else: the swarm's minimum stays 0 but a gap closes."""
    decision = choose_rebalance([T, T, 0, 0, 0, 0, 0, 0], 0, 2, T, 0.75)
    assert decision.start == 2 and "nobody serves" in decision.reason


def test_partial_overlap_moves_count_only_blocks_left_and_gained() -> None:
    # me on 0:4; others hold 0:5 and nothing on 5:6; moving to 2:6 leaves 0:2 (still served) and gains 5
    decision = choose_rebalance([T, T, T, T, T, 0.0], 0, 4, T, 0.75)
    assert decision.start == 2


def test_stays_when_disabled_or_meaningless() -> None:
    others = [T, T, T, T, 0, 0, 0, 0]
    assert "disabled" in choose_rebalance(others, 0, 4, T, 0.0).reason
    assert not choose_rebalance(others, 0, 4, 0.0, 0.75).move  # announces no throughput: moving changes nothing
    assert not choose_rebalance(others, 6, 10, T, 0.75).move  # a span past the model's end (corrupt state)


def test_ties_keep_the_current_place() -> None:
    """Equally weak windows elsewhere are no reason to move (the earliest-tie rule does not apply to moves)."""
    assert not choose_rebalance([0.0, 0.0, 5.0, 5.0, 0.0, 0.0], 4, 6, 1.0, 1.0).move
    assert not choose_rebalance([1.0] * 6, 2, 4, 1.0, 1.0).move
