"""The crawl's pure parts: planning the fan-out, merging parts, capping, Celery's JSON round trip."""

from __future__ import annotations

import math

from monitor.crawl import (
    FetchPart,
    ModelCrawl,
    PartResult,
    PingCache,
    _without_bad_peer_ids,
    bootstrap_peer_ids,
    cap_servers,
    merge_parts,
    ping_order,
    plan_parts,
)
from monitor.targets import ModelTarget
from swarm.data_structures import RemoteSpanInfo, ServerInfo, ServerState
from swarm.ping import PingResult
from tests.test_monitor_snapshots import peer, span


def test_plan_parts_splits_large_models_into_even_ranges():
    targets = [ModelTarget("big-hf", 80, "Big"), ModelTarget("small-hf", 8, "Small")]
    parts = plan_parts(targets, blocks_per_part=32)
    assert [(p.dht_prefix, p.start, p.end) for p in parts] == [
        ("big-hf", 0, 27),
        ("big-hf", 27, 53),
        ("big-hf", 53, 80),
        ("small-hf", 0, 8),
    ]
    assert [(p.start, p.end) for p in plan_parts(targets[1:], blocks_per_part=4)] == [(0, 4), (4, 8)]


def _implicit(peer_id: str, start: int, end: int, state: ServerState = ServerState.ONLINE) -> RemoteSpanInfo:
    """A span built from the blocks a server appears under (it announced no start/end)."""
    return RemoteSpanInfo(peer_id, start, end, ServerInfo(state=state, throughput=1.0))


def test_merge_joins_a_server_seen_in_several_parts():
    target = ModelTarget("big-hf", 80, "Big")
    first, second = FetchPart("big-hf", 80, 0, 40), FetchPart("big-hf", 80, 40, 80)
    a, b, c = peer("a"), peer("b"), peer("c")
    results = [
        PartResult(first, {a: _implicit(a, 30, 40), b: _implicit(b, 0, 10, ServerState.JOINING)}, invalid_entries=2),
        PartResult(second, {a: _implicit(a, 40, 52), b: _implicit(b, 40, 41), c: span(c, 0, 80)}, invalid_entries=1),
    ]
    (crawl,) = merge_parts([target], results)
    assert (crawl.spans[a].start, crawl.spans[a].end) == (30, 52)
    assert crawl.spans[b].state == ServerState.ONLINE and (crawl.spans[b].start, crawl.spans[b].end) == (40, 41)
    assert (crawl.spans[c].start, crawl.spans[c].end) == (0, 80)
    assert crawl.invalid_entries == 3


def test_the_cap_keeps_what_the_monitor_verified_not_what_servers_claim():
    target = ModelTarget("m-hf", 8, "M")
    claims = {"throughput": 1e9, "public_name": "fake"}
    fakes = {peer(i): span(peer(i), 0, 8, **claims) for i in range(50)}
    reached, known, failed, joining = peer("reached"), peer("known"), peer("failed"), peer("joining")
    real = {
        reached: span(reached, 0, 1, throughput=1.0),
        known: span(known, 3, 4, throughput=1.0),  # seen reachable by earlier crawls, not pinged now
        failed: span(failed, 2, 3, throughput=1.0),
        joining: span(joining, 0, 1, ServerState.JOINING, throughput=1.0),
    }
    pings = {reached: PingResult(True, 0.01), failed: PingResult(False, error="down")}
    pinged_fakes = set(list(fakes)[:10])
    pings.update({p: PingResult(False, error="no route") for p in pinged_fakes})

    crawl = ModelCrawl(target, {**fakes, **real})
    cap_servers(crawl, 14, pings, known_good={known, joining}, salt=b"s")
    # Reached now, then known good, then found unreachable; the 40 unchecked fakes claiming the most go.
    assert set(crawl.spans) == {reached, known, joining, failed} | pinged_fakes
    assert crawl.capped_servers == 40
    crawl = ModelCrawl(target, {**fakes, **real})
    cap_servers(crawl, 3, pings, known_good={known, joining}, salt=b"s")
    assert set(crawl.spans) == {reached, known, joining}


def test_part_results_survive_the_json_round_trip():
    part = FetchPart("m-hf", 8, 0, 8)
    a = peer("a")
    original = PartResult(
        part,
        {a: span(a, 0, 8, public_name="x", next_pings={peer("b"): math.inf, peer("c"): 0.5}, adapters=("lora",))},
        invalid_entries=4,
        pings={a: PingResult(True, 0.01), peer("b"): PingResult(False, error="down")},
        dht_timeouts=1,
    )
    restored = PartResult.from_json(original.to_json())
    assert restored == original


def test_bootstrap_peer_ids_come_from_multiaddrs():
    addrs = [
        f"/ip4/127.0.0.1/tcp/31337/p2p/{peer(1)}",
        f"/dns/example.org/tcp/31337/p2p/{peer(1)}",
        f"/ip4/10.0.0.1/tcp/1/p2p/{peer(2)}",
        "/ip4/10.0.0.1/tcp/1",
    ]
    assert bootstrap_peer_ids(addrs) == [peer(1), peer(2)]


def test_subkeys_that_are_not_peer_ids_are_dropped_and_counted():
    part = FetchPart("m-hf", 8, 0, 8)
    bad = "<img src=x onerror=alert(1)>"
    result = PartResult(part, {bad: span(bad, 2, 5), peer(1): span(peer(1), 0, 8)})
    cleaned = _without_bad_peer_ids(result)
    assert list(cleaned.spans) == [peer(1)]
    assert cleaned.invalid_entries == 3  # the blocks it appeared under


def test_ping_order_puts_known_good_servers_first_and_ignores_claims():
    spans = [span(peer(i), 0, 8, throughput=1e9) for i in range(20)] + [
        span(peer("a"), 0, 1, throughput=1.0),
        span(peer("b"), 3, 4, throughput=2.0),
        span(peer("c"), 0, 8, ServerState.JOINING),  # not online: not pinged
    ]
    first = [s.peer_id for s in ping_order(spans, {peer("a"), peer("b"), peer("c")}, b"salt one")]
    assert set(first[:2]) == {peer("a"), peer("b")} and len(first) == 22
    # The rest come in a salted order: another crawl's salt gives another order (every server gets its turn).
    second = [s.peer_id for s in ping_order(spans, {peer("a"), peer("b")}, b"salt two")]
    assert first[2:] != second[2:] and set(first[2:]) == set(second[2:])
    assert first == [s.peer_id for s in ping_order(reversed(spans), {peer("a"), peer("b")}, b"salt one")]


def test_ping_cache_reuses_results_until_they_expire(monkeypatch):
    now = [1000.0]  # the cache's clock, moved by the test
    monkeypatch.setattr("monitor.crawl.time.monotonic", lambda: now[0])
    cache = PingCache(ttl=300)
    cache.store({peer(1): PingResult(True, 0.01)})
    assert cache.fresh([peer(1), peer(2)]) == {peer(1): PingResult(True, 0.01)}
    now[0] += 299.9
    assert cache.fresh([peer(1)]) == {peer(1): PingResult(True, 0.01)}
    now[0] += 0.1
    assert cache.fresh([peer(1)]) == {}
    off = PingCache(ttl=0)
    off.store({peer(1): PingResult(True, 0.01)})
    assert off.fresh([peer(1)]) == {}
