"""Route choice over spans: minimum-latency chains and throughput-weighted chains (pure functions)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable

import pytest

from swarm.client.routing import RouteSpan, _min_latency_route, _throughput_route, describe_blocks
from swarm.data_structures import RemoteSpanInfo, ServerInfo, ServerState


def span(peer: str, start: int, end: int, throughput: float = 1.0) -> RemoteSpanInfo:
    return RemoteSpanInfo(peer, start, end, ServerInfo(ServerState.ONLINE, throughput))


def linear_cost(rtt: dict[str, float], per_block: dict[str, float]) -> Callable[[RemoteSpanInfo, int], float]:
    """cost = round trip + blocks x seconds per block, per server."""
    return lambda s, blocks: rtt[s.peer_id] + blocks * per_block[s.peer_id]


def route_cost(route: list[RouteSpan], spans: list[RemoteSpanInfo], cost) -> float:
    by_peer = {s.peer_id: s for s in spans}
    return sum(cost(by_peer[r.peer_id], r.end - r.start) for r in route)


def assert_contiguous(route: list[RouteSpan], start: int, end: int, spans: list[RemoteSpanInfo]) -> None:
    by_peer = {s.peer_id: s for s in spans}
    assert route, "empty route"
    assert route[0].start == start and route[-1].end == end
    for prev, nxt in zip(route, route[1:]):
        assert prev.end == nxt.start
    for r in route:
        assert r.start < r.end
        assert by_peer[r.peer_id].start <= r.start and r.end <= by_peer[r.peer_id].end


# ----- minimum latency -----


def test_one_fast_server_beats_two_slow_hops() -> None:
    spans = [span("fast", 0, 8), span("slowA", 0, 4), span("slowB", 4, 8)]
    cost = linear_cost({"fast": 0.01, "slowA": 0.01, "slowB": 0.01}, {"fast": 0.01, "slowA": 0.1, "slowB": 0.1})
    assert _min_latency_route(spans, 0, 8, cost) == [RouteSpan("fast", 0, 8)]


def test_two_near_servers_beat_one_far_server() -> None:
    spans = [span("far", 0, 8), span("nearA", 0, 4), span("nearB", 4, 8)]
    cost = linear_cost({"far": 1.0, "nearA": 0.01, "nearB": 0.01}, {"far": 0.01, "nearA": 0.01, "nearB": 0.01})
    assert _min_latency_route(spans, 0, 8, cost) == [RouteSpan("nearA", 0, 4), RouteSpan("nearB", 4, 8)]


def test_route_is_optimal_among_span_end_chains() -> None:
    """Three servers with different prices; the DP's answer has the cheapest total."""
    spans = [span("a", 0, 3), span("b", 0, 6), span("c", 3, 9), span("d", 6, 9)]
    cost = linear_cost({"a": 0.0, "b": 0.5, "c": 0.2, "d": 0.0}, {"a": 0.1, "b": 0.1, "c": 0.1, "d": 0.3})
    route = _min_latency_route(spans, 0, 9, cost)
    assert_contiguous(route, 0, 9, spans)
    # a(0:3)=0.3 + c(3:9)=0.8 = 1.1; b(0:6)+d(6:9)=1.1+0.9=2.0; a+c(3:6)+d = 0.3+0.5+0.9=1.7
    assert route == [RouteSpan("a", 0, 3), RouteSpan("c", 3, 9)]
    assert route_cost(route, spans, cost) == pytest.approx(1.1)


def test_returns_none_when_a_block_is_uncovered() -> None:
    spans = [span("a", 0, 3), span("b", 4, 8)]
    cost = linear_cost({"a": 0.0, "b": 0.0}, {"a": 1.0, "b": 1.0})
    assert _min_latency_route(spans, 0, 8, cost) is None
    assert _min_latency_route([], 0, 1, cost) is None
    # ...but a sub-range that avoids the hole is fine
    assert _min_latency_route(spans, 4, 8, cost) == [RouteSpan("b", 4, 8)]


def test_respects_sub_range() -> None:
    """Routes for [start, end) start and stop exactly there, even inside a longer span."""
    spans = [span("a", 0, 8), span("b", 2, 6)]
    cost = linear_cost({"a": 0.0, "b": 0.0}, {"a": 1.0, "b": 0.1})
    assert _min_latency_route(spans, 3, 5, cost) == [RouteSpan("b", 3, 5)]
    assert _min_latency_route(spans, 6, 7, cost) == [RouteSpan("a", 6, 7)]
    route = _min_latency_route(spans, 1, 7, cost)
    assert_contiguous(route, 1, 7, spans)


def test_cost_is_called_with_clipped_block_counts() -> None:
    calls: list[tuple[str, int]] = []

    def cost(s: RemoteSpanInfo, blocks: int) -> float:
        calls.append((s.peer_id, blocks))
        return 1.0

    assert _min_latency_route([span("a", 0, 10)], 2, 5, cost) == [RouteSpan("a", 2, 5)]
    assert calls == [("a", 3)]


def test_empty_range_is_an_empty_route() -> None:
    assert _min_latency_route([span("a", 0, 2)], 1, 1, lambda s, n: 1.0) == []


def test_can_leave_a_span_early_for_a_faster_server() -> None:
    spans = [span("slow", 0, 8), span("fast", 4, 8)]
    cost = linear_cost({"slow": 0.01, "fast": 0.01}, {"slow": 1.0, "fast": 0.01})
    route = _min_latency_route(spans, 0, 8, cost)
    assert route == [RouteSpan("slow", 0, 4), RouteSpan("fast", 4, 8)]


# ----- throughput-weighted -----


def test_throughput_route_covers_range_contiguously() -> None:
    spans = [span("a", 0, 3, 5.0), span("b", 2, 6, 1.0), span("c", 5, 10, 2.0), span("d", 0, 10, 0.5)]
    rng_state = random.getstate()
    try:
        random.seed(1234)
        for _ in range(200):
            start = random.randrange(0, 9)
            end = random.randrange(start + 1, 11)
            route = _throughput_route(spans, start, end)
            assert_contiguous(route, start, end, spans)
    finally:
        random.setstate(rng_state)


def test_throughput_route_none_when_uncovered() -> None:
    spans = [span("a", 0, 3), span("b", 4, 8)]
    assert _throughput_route(spans, 0, 8) is None
    assert _throughput_route([], 0, 1) is None
    assert _throughput_route(spans, 4, 6) == [RouteSpan("b", 4, 6)]


def test_throughput_route_is_proportional_to_throughput() -> None:
    """Two servers holding the same blocks: picked about 1:3 when throughputs are 1 and 3."""
    spans = [span("slow", 0, 4, 1.0), span("fast", 0, 4, 3.0), span("dead", 0, 4, 0.0)]
    rng_state = random.getstate()
    try:
        random.seed(0)
        n = 4000
        counts = Counter(_throughput_route(spans, 0, 4)[0].peer_id for _ in range(n))
    finally:
        random.setstate(rng_state)
    assert counts["fast"] + counts["slow"] + counts["dead"] == n
    assert counts["fast"] / n == pytest.approx(0.75, abs=0.03)
    assert counts["slow"] / n == pytest.approx(0.25, abs=0.03)
    assert counts["dead"] <= 2  # zero throughput gets only a negligible weight


def test_throughput_route_zero_throughput_still_usable_alone() -> None:
    assert _throughput_route([span("a", 0, 2, 0.0)], 0, 2) == [RouteSpan("a", 0, 2)]


# ----- describe_blocks -----


@pytest.mark.parametrize(
    ("blocks", "text"),
    [
        ([4, 5, 6, 7, 9], "4–7, 9"),
        ([0], "0"),
        ([], ""),
        ([1, 3, 5], "1, 3, 5"),
        ([0, 1], "0–1"),
        ([2, 3, 4, 10, 11, 20], "2–4, 10–11, 20"),
    ],
)
def test_describe_blocks(blocks: list[int], text: str) -> None:
    assert describe_blocks(blocks) == text
