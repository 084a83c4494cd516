"""A swarm anyone can write to (issue 21): strangers announce thousands of servers that claim everything
(ONLINE on every block, throughput 1e9) with no process behind them. The page must rank by what the monitor
verified, count only servers it reached, clamp claims, survive slow pings, and list only indexed models
that real servers hold.

The crawl runs its real code (merging, ping order, `ping_peers`, `_ping_in_dht` with `ping_within`, the
cap, the snapshot write); only the DHT process is played by an event loop in a thread (`LoopbackDHT`) and
`ping_server` by a table of who answers, so that 6000 peers cost a second. bench/bench_crawl.py --fakes
floods a real DHT."""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import threading
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from monitor import crawl as crawl_module
from monitor.crawl import CrawlOptions, FetchPart, KnownGood, PartResult, finish_crawl, new_salt
from monitor.models import ModelStatus, ServerObservation
from monitor.snapshots import MAX_THROUGHPUT, write_snapshot
from monitor.targets import ModelTarget
from playground.availability import from_monitor
from swarm.ping import PingResult
from tests.test_monitor_snapshots import MODEL, REACHABLE, crawl_result, peer, span

pytestmark = pytest.mark.django_db

FAKES = 6000
CLAIMS = {"throughput": 1e9, "inference_rps": 1e9, "forward_rps": 1e9, "public_name": "fake", "version": "9.9"}


class LoopbackDHT:
    """Runs `run_coroutine` calls on an event loop of its own, as hivemind's DHT process runs them in its
    loop; `wedged` lists the calls (by number) that never answer."""

    def __init__(self, wedged: tuple[int, ...] = ()):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.wedged = wedged
        self.calls = 0

    def run_coroutine(self, coroutine: Callable, return_future: bool = False) -> Any:
        number, self.calls = self.calls, self.calls + 1
        if number in self.wedged:
            future: concurrent.futures.Future = concurrent.futures.Future()  # never set
        else:
            future = asyncio.run_coroutine_threadsafe(coroutine(self, SimpleNamespace(p2p=None)), self.loop)
        return future if return_future else future.result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def loopback() -> Iterator[Callable[..., LoopbackDHT]]:
    made: list[LoopbackDHT] = []

    def make(wedged: tuple[int, ...] = ()) -> LoopbackDHT:
        made.append(LoopbackDHT(wedged))
        return made[-1]

    yield make
    for dht in made:
        dht.close()


@pytest.fixture
def pings(monkeypatch) -> dict[str, Any]:
    """Who answers `ping_server`: peer id -> a PingResult, or "hang" (no answer until its timeout). Anyone
    else fails at once, as a peer id with no process behind it does on a real DHT."""
    answers: dict[str, Any] = {}

    async def ping_server(p2p: Any, peer_id: str, timeout: float) -> PingResult:
        answer = answers.get(peer_id)
        if answer == "hang":
            await asyncio.sleep(timeout)
            return PingResult(False, error=f"no answer within {timeout:g} s")
        return answer or PingResult(False, error="routing: not found")

    monkeypatch.setattr(crawl_module, "ping_server", ping_server)
    return answers


def _part(target: ModelTarget, spans: list) -> PartResult:
    return PartResult(
        FetchPart(target.dht_prefix, target.num_blocks, 0, target.num_blocks), {s.peer_id: s for s in spans}
    )


def _flood(target: ModelTarget, count: int, victim: str) -> list:
    """Fake servers on every block claiming the most, each reporting that `victim` is unreachable."""
    return [
        span(peer(f"fake {i}"), 0, target.num_blocks, next_pings={victim: math.inf}, **CLAIMS) for i in range(count)
    ]


# ----- item 1: rank by what was verified; 6000 fakes + 2 real servers -----


def test_six_thousand_fakes_claiming_everything_leave_the_two_real_servers_on_the_page(client, loopback, pings):
    from monitor.tasks import known_good

    alice, bob = peer("alice"), peer("bob")
    real = [span(alice, 0, 4, public_name="alice"), span(bob, 4, 8, public_name="bob", next_pings={alice: 0.01})]
    # Before the flood, a crawl reached both real servers.
    write_snapshot(crawl_result({MODEL: real}, {alice: REACHABLE, bob: REACHABLE}, started_at=time.time() - 60))
    pings.update({alice: REACHABLE, bob: REACHABLE})

    options = CrawlOptions(ping_timeout=1.0, ping_budget=30.0)  # the defaults' caps: 5000 pings, 2000 servers
    cap = CrawlOptions().max_servers_per_model
    result = finish_crawl(
        loopback(),
        time.time(),
        [MODEL],
        [_part(MODEL, _flood(MODEL, FAKES, alice) + real)],
        [],
        options,
        None,
        known_good=known_good(),
        salt=new_salt(),
    )
    assert result.models[0].capped_servers == FAKES + 2 - cap
    write_snapshot(result)

    state = client.get("/api/v1/state").json()
    (model,) = state["model_reports"]
    rows = {row["peer_id"]: row for row in model["server_rows"]}
    assert len(rows) == cap and rows[alice]["state"] == rows[bob]["state"] == "online"
    assert model["state"] == "healthy"
    assert {row["state"] for peer_id, row in rows.items() if peer_id not in (alice, bob)} <= {"unreachable", "unknown"}
    assert state["top_contributors"] == {"alice": 4, "bob": 4}
    # 4998 fakes say alice is unreachable; bob, whom the monitor reached, says she answers: no issue.
    assert alice not in {issue["peer_id"] for issue in state["reachability_issues"]}
    assert rows[alice]["pings_to_me"] == {bob: 0.01}
    html = client.get("/").content.decode()
    assert f'data-peer-id="{alice}"' in html and f'data-peer-id="{bob}"' in html

    metrics = client.get("/metrics").content.decode()
    assert "servers_num_online 2\n" in metrics
    assert f'blocks{{model="{MODEL.dht_prefix}",state="online"}} 8\n' in metrics
    assert 'server_version{version_number="9.9"}' not in metrics
    availability = from_monitor([MODEL.dht_prefix])[MODEL.dht_prefix]
    assert availability.state == "available" and availability.servers == 2


def test_the_ping_budget_goes_to_known_good_servers_first(loopback, pings):
    alice = peer("alice")
    pings[alice] = REACHABLE
    fakes = _flood(MODEL, 500, alice)
    options = CrawlOptions(max_pings=100, max_servers_per_model=50)
    result = finish_crawl(
        loopback(),
        time.time(),
        [MODEL],
        [_part(MODEL, [*fakes, span(alice, 0, 1, throughput=1.0)])],
        [],
        options,
        None,
        known_good=KnownGood(frozenset({alice})),
        salt=new_salt(),
    )
    assert result.pings[alice] == REACHABLE
    assert alice in result.models[0].spans and len(result.models[0].spans) == 50
    # The other 99 pings went to fakes (found unreachable, kept before those not checked).
    assert sum(not ping.reachable for ping in result.pings.values()) == 49
    assert result.unchecked_servers == 0


def test_a_server_not_checked_is_unknown_and_counts_nowhere(client):
    fake, real = peer("fake"), peer("real")
    write_snapshot(
        crawl_result(
            {MODEL: [span(fake, 0, 8, **CLAIMS), span(real, 0, 4, public_name="real", inference_rps=5.0)]},
            {real: REACHABLE},  # the fake was over the ping budget
        )
    )
    assert ServerObservation.objects.get(peer_id=fake).reachable is None
    state = client.get("/api/v1/state").json()
    (model,) = state["model_reports"]
    rows = {row["peer_id"]: row for row in model["server_rows"]}
    assert rows[fake]["state"] == "unknown" and rows[real]["state"] == "online"
    assert model["state"] == "broken"  # blocks 4:8 are held only by a server nobody checked
    assert state["top_contributors"] == {"real": 4}
    assert "No online server holds blocks 4:8." in client.get("/").content.decode()
    metrics = client.get("/metrics").content.decode()
    assert f'blocks{{model="{MODEL.dht_prefix}",state="unknown"}} 8\n' in metrics
    assert f'rps_avg{{model="{MODEL.dht_prefix}",rps="inference"}} 2.5\n' in metrics  # 5.0 on half the blocks
    availability = from_monitor([MODEL.dht_prefix])[MODEL.dht_prefix]
    assert availability.state == "partial" and availability.missing_blocks == (4, 5, 6, 7)


def test_known_good_servers_come_from_recent_snapshots():
    from monitor.tasks import known_good

    other = ModelTarget("other-hf", 4, "Other")
    now = time.time()
    old, recent, down = peer("old"), peer("recent"), peer("down")
    write_snapshot(crawl_result({MODEL: [span(old, 0, 8)]}, {old: REACHABLE}, started_at=now - 600))
    for age in (300, 240, 180):
        write_snapshot(
            crawl_result(
                {MODEL: [span(recent, 0, 8), span(down, 0, 8)], other: [span(recent, 0, 4)]},
                {recent: REACHABLE, down: PingResult(False, error="x")},
                started_at=now - age,
            )
        )
    assert known_good(3) == KnownGood(frozenset({recent}), {MODEL.dht_prefix: 1, "other-hf": 1})
    assert known_good(4).peers == {old, recent}


# ----- item 2: one time budget for pings, partial results kept -----


def test_slow_pings_cost_their_servers_not_the_crawl(loopback, pings):
    """Ten dead peers answering nothing until their timeout, pinged two at a time, would take 25 s: past
    the DHT timeout, which lost the whole crawl. The budget ends the pings; what answered is kept."""
    alice = peer("alice")
    pings[alice] = REACHABLE
    dead = [span(peer(f"dead {i}"), 0, 8) for i in range(10)]
    pings.update({s.peer_id: "hang" for s in dead})
    options = CrawlOptions(ping_timeout=5.0, ping_parallel=2, ping_budget=0.5, dht_timeout=2.0)
    result = finish_crawl(
        loopback(),
        time.time(),
        [MODEL],
        [_part(MODEL, [span(alice, 0, 8), *dead])],
        [],
        options,
        None,
        known_good=KnownGood(frozenset({alice})),
    )
    assert result.pings == {alice: REACHABLE}
    assert result.unchecked_servers == 10 and result.dht_timeouts == 0
    snapshot = write_snapshot(result)
    assert snapshot.models.get().healthy


def test_a_wedged_ping_call_leaves_its_batch_unchecked_and_the_crawl_is_saved(loopback, pings, monkeypatch):
    monkeypatch.setattr(crawl_module, "PING_BATCH", 2)
    monkeypatch.setattr(crawl_module, "PING_GRACE", 0.2)
    servers = [span(peer(i), 0, 8) for i in range(6)]
    pings.update({s.peer_id: REACHABLE for s in servers})
    options = CrawlOptions(ping_budget=0.2, dht_timeout=0.5)
    result = finish_crawl(
        loopback(wedged=(1,)),  # the second batch's call never answers
        time.time(),
        [MODEL],
        [_part(MODEL, servers)],
        [],
        options,
        None,
        salt=b"fixed",
    )
    assert len(result.pings) == 4 and all(ping.reachable for ping in result.pings.values())
    assert result.unchecked_servers == 2 and result.dht_timeouts == 1
    assert write_snapshot(result).models.get().healthy


# ----- item 3: claims clamped, aggregates and reports only from verified servers -----


def test_claimed_throughput_is_clamped_and_sums_only_verified_servers():
    real, fake = peer("real"), peer("fake")
    write_snapshot(crawl_result({MODEL: [span(real, 0, 8, **CLAIMS), span(fake, 0, 8, **CLAIMS)]}, {real: REACHABLE}))
    row = ServerObservation.objects.get(peer_id=real)
    assert row.throughput == row.inference_rps == MAX_THROUGHPUT
    status = ModelStatus.objects.get(dht_prefix=MODEL.dht_prefix)
    # The unchecked fake adds neither a server nor its claim.
    assert list(zip(status.coverage, status.coverage_throughput)) == [(1, MAX_THROUGHPUT)] * 8


def test_strangers_next_pings_do_not_make_a_healthy_server_an_issue(client):
    a, b, honest, liar, stranger = (peer(n) for n in ("a", "b", "honest", "liar", "stranger"))
    write_snapshot(
        crawl_result(
            {
                MODEL: [
                    span(a, 0, 4),  # the monitor reaches it; only a stranger it never reached accuses it
                    span(stranger, 0, 8, next_pings={a: math.inf, b: math.inf}),
                    span(b, 4, 8),  # reached; one verified server fails to reach it, another succeeds
                    span(liar, 0, 4, next_pings={b: math.inf}),
                    span(honest, 0, 4, next_pings={b: 0.02}),
                ]
            },
            {a: REACHABLE, b: REACHABLE, honest: REACHABLE, liar: REACHABLE},
        )
    )
    state = client.get("/api/v1/state").json()
    assert state["reachability_issues"] == []
    rows = {row["peer_id"]: row for row in state["model_reports"][0]["server_rows"]}
    assert rows[a]["pings_to_me"] == {} and rows[b]["pings_to_me"] == {liar: None, honest: 0.02}


# ----- item 4: indexed models are listed once a reachable server holds them -----


def test_indexed_models_are_listed_only_when_a_reachable_server_holds_them(loopback, pings):
    configured = ModelTarget("configured-hf", 4, "Configured")  # no server at all: still listed
    served = ModelTarget("served-hf", 4, "o/Served", "https://huggingface.co/o/Served", official=False)
    claimed = ModelTarget("claimed-hf", 4, "o/Claimed", "https://huggingface.co/o/Claimed", official=False)
    real, fake = peer("real"), peer("fake")
    pings[real] = REACHABLE
    parts = [
        _part(configured, []),
        _part(served, [span(real, 0, 4)]),
        _part(claimed, [span(fake, 0, 4, **CLAIMS)]),  # only a server that does not answer
    ]
    result = finish_crawl(
        loopback(), time.time(), [configured, served, claimed], parts, [], CrawlOptions(), None, skipped_models=3
    )
    assert [m.target.dht_prefix for m in result.models] == ["configured-hf", "served-hf"]
    assert result.skipped_models == 4
    assert fake not in result.pings  # not kept: its model is not listed


# ----- scale: reads small enough for the DHT, and not too many at once -----


def test_parts_are_read_a_few_blocks_at_a_time_and_joined(loopback, monkeypatch):
    """A read of many blocks packs several flooded blocks into one reply, over p2pd's 4 MB limit, and ten
    models' parts read all at once timed out at the peer holding them: hivemind then blacklisted that peer
    and the next crawls found 0 servers."""
    from hivemind.utils import MSGPackSerializer

    from swarm.data_structures import ServerInfo, ServerState
    from swarm.names import block_uid

    reads: list[tuple[str, int, int]] = []
    reading, most = 0, 0
    # One server on every block, announcing no span (its span is where it was seen), and one junk value per read.
    implicit = (MSGPackSerializer.dumps(ServerInfo(ServerState.ONLINE, 1.0).to_tuple()), 1e12)

    async def read_block_entries(node, prefix, start, end):
        nonlocal reading, most
        reads.append((prefix, start, end))
        reading += 1
        most = max(most, reading)
        await asyncio.sleep(0.01)
        reading -= 1
        entries = {block_uid(prefix, index): {peer(prefix): implicit} for index in range(start, end)}
        entries[block_uid(prefix, start)]["QmJunk"] = (b"\xc1", 1e12)
        return entries

    monkeypatch.setattr(crawl_module, "read_block_entries", read_block_entries)
    targets = [ModelTarget(f"m{i}-hf", 80, f"M{i}") for i in range(10)]
    parts = crawl_module.plan_parts(targets, 32)
    results = crawl_module.fetch_parts(loopback(), parts, timeout=30)

    assert max(end - start for _, start, end in reads) == crawl_module.FETCH_BLOCKS_PER_READ
    assert most == crawl_module.FETCH_READS_AT_ONCE
    assert [r.part for r in results] == parts
    for result in results:
        (joined,) = result.spans.values()
        assert (joined.start, joined.end) == (result.part.start, result.part.end)
        assert result.invalid_entries == math.ceil((result.part.end - result.part.start) / 2)
