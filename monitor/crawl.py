"""One crawl of the swarm, independent of Celery and of Django's settings (`CrawlOptions` carries them):
read block announcements, build per-server spans, ping servers and bootstrap peers.

A crawl is split into parts (a model, or a block range of a large model) so Celery can fan it out;
`run_crawl` runs every part in this process. Coroutines named `_..._in_dht` run inside the DHT
process (`DHT.run_coroutine`), where the answers arrive, so only parsed results cross the pipe.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import re
import threading
import time
from collections.abc import Collection, Iterable, Mapping
from functools import partial
from typing import Any

from hivemind import DHT
from hivemind.dht.node import DHTNode

from monitor.conf import CrawlOptions  # (also importable from here, as before)
from monitor.gcpause import paused_gc
from monitor.targets import ModelTarget, choose_targets, salted_key
from swarm.data_structures import RemoteSpanInfo, ServerInfo, ServerState
from swarm.dht import SpanBuilder, fetch_model_index, merge_span, read_block_entries, shared_parsing
from swarm.ping import PingResult, ping_dht_peer, ping_server, ping_within

logger = logging.getLogger(__name__)

PEER_ID = re.compile(r"[1-9A-HJ-NP-Za-km-z]{20,128}")  # base58
# Peer ids per call into the DHT process: hivemind's pipe into it breaks on messages over ~60 KB
# (uvloop makes it non-blocking), and that kills the DHT process.
PING_BATCH = 200
# Reading blocks from the DHT: hivemind packs about sqrt(keys) blocks of one `get_many` into one request,
# and a block's value holds every server announced there (about 1 MB under a flood of 6000). A reply over
# p2pd's 4 MB message limit fails, as do requests that time out when hundreds are in flight at a peer
# holding large values; hivemind then blacklists the peer and drops it from its routing table, and the next
# crawls read nothing from it ("the crawl found 0 servers"; see also swarm_client.CRAWL_REQUEST_TIMEOUT).
# So a part is read FETCH_BLOCKS_PER_READ blocks at a time (one block per request), at most
# FETCH_READS_AT_ONCE reads at once per call into the DHT process.
FETCH_BLOCKS_PER_READ = 2
FETCH_READS_AT_ONCE = 8
# Seconds past the ping budget that a call into the DHT process may take to return what it has: past it,
# the DHT process is taken as wedged (its batch's servers stay unchecked).
PING_GRACE = 5.0


@dataclasses.dataclass(frozen=True)
class KnownGood:
    """What earlier crawls verified, loaded from the database by the task layer (the crawl has no Django):
    servers that answered the monitor's own pings, and per model how many distinct such servers it had.

    It ranks servers for the ping budget and the per-model cap, and indexed models for the crawl, by what
    the monitor saw rather than by what anyone announces (any stranger can claim ONLINE on every block)."""

    peers: frozenset[str] = frozenset()
    models: Mapping[str, int] = dataclasses.field(default_factory=dict)  # dht_prefix -> verified servers


def new_salt() -> bytes:
    """A fresh secret per crawl for `salted_key`: strangers cannot pick peer ids that sort first."""
    return os.urandom(16)


@dataclasses.dataclass(frozen=True)
class FetchPart:
    """Blocks [start, end) of one model."""

    dht_prefix: str
    num_blocks: int
    start: int
    end: int

    def to_json(self) -> list[Any]:
        return [self.dht_prefix, self.num_blocks, self.start, self.end]

    @classmethod
    def from_json(cls, data: list[Any]) -> FetchPart:
        return cls(*data)


@dataclasses.dataclass
class PartResult:
    part: FetchPart
    spans: dict[str, RemoteSpanInfo]
    invalid_entries: int = 0
    pings: dict[str, PingResult] = dataclasses.field(default_factory=dict)
    dht_timeouts: int = 0  # calls into the DHT process that did not answer in time (pings left unchecked)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able form for Celery results (values are re-validated by `from_json`)."""
        return {
            "part": self.part.to_json(),
            "spans": [[s.peer_id, s.start, s.end, _finite(s.server_info.to_tuple())] for s in self.spans.values()],
            "invalid_entries": self.invalid_entries,
            "pings": {peer: [p.reachable, p.rtt, p.error] for peer, p in self.pings.items()},
            "dht_timeouts": self.dht_timeouts,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PartResult:
        spans = {}
        for peer_id, start, end, value in data["spans"]:
            spans[peer_id] = RemoteSpanInfo(peer_id, start, end, ServerInfo.from_tuple(_infinite(value)))
        pings = {peer: PingResult(*fields) for peer, fields in data["pings"].items()}
        timeouts = data.get("dht_timeouts", 0)
        return cls(FetchPart.from_json(data["part"]), spans, data["invalid_entries"], pings, timeouts)


def _finite(value: Any) -> Any:
    # JSON has no inf (unreachable next_pings); -1 stands for it on the way through Celery.
    state, throughput, extra = value
    if extra.get("next_pings"):
        extra = {**extra, "next_pings": {k: (-1.0 if math.isinf(v) else v) for k, v in extra["next_pings"].items()}}
    return [state, throughput, extra]


def _infinite(value: Any) -> Any:
    state, throughput, extra = value
    if extra.get("next_pings"):
        extra = {**extra, "next_pings": {k: (math.inf if v == -1.0 else v) for k, v in extra["next_pings"].items()}}
    return [state, throughput, extra]


@dataclasses.dataclass
class ModelCrawl:
    target: ModelTarget
    spans: dict[str, RemoteSpanInfo]
    invalid_entries: int = 0
    capped_servers: int = 0  # servers beyond `max_servers_per_model`, not stored


@dataclasses.dataclass
class CrawlResult:
    started_at: float  # unix time
    duration: float
    models: list[ModelCrawl]
    pings: dict[str, PingResult]  # by server peer id; a server missing here was not checked
    bootstrap: dict[str, PingResult]  # by bootstrap peer id, in configuration order
    invalid_index_entries: int = 0
    skipped_models: int = 0
    unchecked_servers: int = 0  # online servers left unpinged (over `max_pings` or the ping budget)
    dht_timeouts: int = 0  # calls into this process's DHT that did not answer: its client should be restarted

    @property
    def invalid_entries(self) -> int:
        return sum(model.invalid_entries for model in self.models)


class PingCache:
    """Recent ping results, so that a crawl every minute does not ping every server every minute."""

    def __init__(self, ttl: float):
        self.ttl = ttl
        self._results: dict[str, tuple[float, PingResult]] = {}
        self._lock = threading.Lock()

    def fresh(self, peer_ids: Iterable[str]) -> dict[str, PingResult]:
        now = time.monotonic()
        with self._lock:
            return {
                peer: entry[1]
                for peer in peer_ids
                if (entry := self._results.get(peer)) is not None and now - entry[0] < self.ttl
            }

    def store(self, results: dict[str, PingResult]) -> None:
        if self.ttl <= 0:
            return
        now = time.monotonic()
        with self._lock:
            self._results.update((peer, (now, result)) for peer, result in results.items())
            if len(self._results) > 100_000:  # a flood of fake peers must not grow this without bound
                self._results = {p: e for p, e in self._results.items() if now - e[0] < self.ttl}


# ----- planning -----


def plan_parts(targets: Iterable[ModelTarget], blocks_per_part: int) -> list[FetchPart]:
    """One part per model, or several block ranges of about `blocks_per_part` blocks for a large model."""
    parts = []
    for target in targets:
        count = max(1, math.ceil(target.num_blocks / max(blocks_per_part, 1)))
        bounds = [round(i * target.num_blocks / count) for i in range(count + 1)]
        parts += [FetchPart(target.dht_prefix, target.num_blocks, a, b) for a, b in zip(bounds, bounds[1:])]
    return parts


def bootstrap_peer_ids(initial_peers: Iterable[str]) -> list[str]:
    """Peer ids of the configured multiaddrs (`.../p2p/<id>`), each once, in order."""
    ids = []
    for maddr in initial_peers:
        _, sep, peer_id = str(maddr).rpartition("/p2p/")
        if sep and peer_id and "/" not in peer_id and peer_id not in ids:
            ids.append(peer_id)
    return ids


# ----- DHT work -----


class DHTTimeoutError(TimeoutError):
    """The DHT process did not answer in time (it may be wedged: the caller should start a new one)."""


def dht_result(future: Any, timeout: float, what: str) -> Any:
    """The result of a call into the DHT process, waited for at most `timeout` seconds."""
    try:
        return future.result(timeout=max(timeout, 0.0))
    except TimeoutError:
        future.cancel()
        raise DHTTimeoutError(f"the DHT did not answer within {timeout:g} s ({what})") from None


def fetch_parts(dht: DHT, parts: list[FetchPart], timeout: float) -> list[PartResult]:
    """Read every part's blocks, a few at a time (see FETCH_BLOCKS_PER_READ), in one call into the DHT process."""
    future = dht.run_coroutine(
        partial(_fetch_parts_in_dht, parts=parts, per_read=FETCH_BLOCKS_PER_READ, at_once=FETCH_READS_AT_ONCE),
        return_future=True,
    )
    with paused_gc():  # unpickling thousands of spans
        return dht_result(future, timeout, f"reading {len(parts)} parts")


async def _fetch_parts_in_dht(
    dht: DHT, node: DHTNode, *, parts: list[FetchPart], per_read: int, at_once: int
) -> list[PartResult]:
    reads = [
        (number, start, min(start + max(per_read, 1), part.end))
        for number, part in enumerate(parts)
        for start in range(part.start, part.end, max(per_read, 1))
    ]
    limit = asyncio.Semaphore(max(at_once, 1))
    with paused_gc(), shared_parsing():  # a server's value, read on each of its blocks, is parsed once
        # One builder per part across its reads: a server seen in several reads is looked at once per value.
        builders = [SpanBuilder(part.dht_prefix, part.num_blocks) for part in parts]

        async def read(number: int, start: int, end: int) -> None:
            part = parts[number]
            async with limit:
                entries = await read_block_entries(node, part.dht_prefix, start, end)
            builders[number].add_blocks(start, entries)

        await asyncio.gather(*(read(*args) for args in reads))
    return [
        _without_bad_peer_ids(PartResult(part, builder.spans, builder.invalid_entries))
        for part, builder in zip(parts, builders)
    ]


def _without_bad_peer_ids(result: PartResult) -> PartResult:
    """Peer ids are base58 multihashes; any other subkey is junk (and would end up in URLs and pages)."""
    for peer_id, span in list(result.spans.items()):
        if not PEER_ID.fullmatch(peer_id):
            del result.spans[peer_id]
            result.invalid_entries += max(min(span.end, result.part.end) - max(span.start, result.part.start), 1)
    return result


def fetch_part_and_ping(
    dht: DHT,
    part: FetchPart,
    options: CrawlOptions,
    cache: PingCache | None,
    known_good: KnownGood = KnownGood(),
    salt: bytes = b"",
) -> PartResult:
    """One fan-out task's work: read a block range, then ping the online servers whose span starts in it
    (known good ones first, then in the crawl's salted order), within the ping budget."""
    result = fetch_parts(dht, [part], options.dht_timeout)[0]
    if options.ping:
        spans = [s for s in result.spans.values() if part.start <= s.start < part.end]
        peers = [s.peer_id for s in ping_order(spans, known_good.peers, salt)]
        result.pings, _, result.dht_timeouts = ping_peers(dht, peers, [], options, cache)
    return result


def ping_peers(
    dht: DHT,
    servers: list[str],
    bootstrap: list[str],
    options: CrawlOptions,
    cache: PingCache | None,
    *,
    max_pings: int | None = None,
) -> tuple[dict[str, PingResult], dict[str, PingResult], int]:
    """Ping block servers (rpc_info) and bootstrap peers (DHT ping) in parallel, in the order given:
    (server results, bootstrap results, DHT calls that timed out).

    Servers seen recently are answered from `cache` and cost nothing; at most `max_pings` others are
    pinged (default `options.max_pings`), all within one time budget (`options.ping_budget`). What did not
    answer in time is left out (not checked): a slow or wedged part never costs the results of the rest."""
    cached = cache.fresh(servers) if cache else {}
    limit = options.max_pings if max_pings is None else max_pings
    missing = [peer for peer in dict.fromkeys(servers) if peer not in cached][: max(limit, 0)]
    if not missing and not bootstrap:
        return cached, {}, 0
    budget = max(min(options.ping_budget, options.dht_timeout), 0.0)
    deadline = time.monotonic() + budget + PING_GRACE
    batches = [missing[i : i + PING_BATCH] for i in range(0, len(missing), PING_BATCH)] or [[]]
    futures = [
        dht.run_coroutine(
            partial(
                _ping_in_dht,
                servers=batch,
                bootstrap=bootstrap if number == 0 else [],
                timeout=options.ping_timeout,
                parallel=options.ping_parallel,
                budget=budget,
            ),
            return_future=True,
        )
        for number, batch in enumerate(batches)
    ]
    fresh: dict[str, PingResult] = {}
    boot: dict[str, PingResult] = {}
    timeouts = 0
    for future in futures:
        try:
            batch_pings, batch_boot = dht_result(future, deadline - time.monotonic(), "pinging servers")
        except DHTTimeoutError as e:
            timeouts += 1
            logger.warning("%s: its servers stay unchecked in this crawl", e)
            continue
        fresh.update(batch_pings)
        boot.update(batch_boot)
    if cache:
        cache.store(fresh)
    return {**cached, **fresh}, boot, timeouts


_ping_limits: dict[tuple[int, int], asyncio.Semaphore] = {}


async def _ping_in_dht(
    dht: DHT,
    node: DHTNode,
    *,
    servers: list[str],
    bootstrap: list[str],
    timeout: float,
    parallel: int,
    budget: float,
) -> tuple[dict[str, PingResult], dict[str, PingResult]]:
    """Ping within `budget` seconds; what has not answered by then is left out of the result."""
    # One limit for all batches in flight: they run concurrently in the DHT process's event loop.
    limit = _ping_limits.setdefault((id(asyncio.get_running_loop()), parallel), asyncio.Semaphore(max(parallel, 1)))

    async def ping(peer: str) -> PingResult:
        async with limit:
            return await ping_server(node.p2p, peer, timeout)

    async def ping_boot(peer: str) -> PingResult:
        return await ping_dht_peer(node, peer, timeout)

    pings, boot = await asyncio.gather(
        ping_within(servers, ping, concurrency=parallel, budget=budget),
        ping_within(bootstrap, ping_boot, concurrency=max(len(bootstrap), 1), budget=budget),
    )
    return pings, boot


def ping_order(
    spans: Iterable[RemoteSpanInfo], known_good: Collection[str] = frozenset(), salt: bytes = b""
) -> list[RemoteSpanInfo]:
    """Online servers in the order they are pinged when they exceed the ping budget: those earlier crawls
    found reachable first, then the rest in the crawl's salted order. Never by what servers announce
    (span length, throughput): a flood of strangers claiming the most would take the whole budget."""
    online = [span for span in spans if span.state == ServerState.ONLINE]
    return sorted(online, key=lambda s: (s.peer_id not in known_good, salted_key(salt, s.peer_id)))


# ----- merging -----


def merge_parts(targets: list[ModelTarget], results: Iterable[PartResult]) -> list[ModelCrawl]:
    """Join the parts of each model: a server seen in several parts keeps its highest state and the
    union of its spans."""
    crawls = {target.dht_prefix: ModelCrawl(target, {}) for target in targets}
    for result in results:
        crawl = crawls.get(result.part.dht_prefix)
        if crawl is None:
            continue
        crawl.invalid_entries += result.invalid_entries
        for span in result.spans.values():
            merge_span(crawl.spans, span)
    return list(crawls.values())


def verified_rank(
    span: RemoteSpanInfo, pings: Mapping[str, PingResult], known_good: Collection[str], salt: bytes
) -> tuple[int, bool, bytes]:
    """How a server ranks for the per-model cap, lowest first, by what the monitor itself saw:
    0 answered its ping now, 1 answered in earlier crawls (not pinged now), 2 pinged and unreachable,
    3 not checked (over the ping budget, or not announced online). Ties: known good first, then salted."""
    ping = pings.get(span.peer_id)
    good = span.peer_id in known_good
    checked_tier = 0 if ping is not None and ping.reachable else 2
    return checked_tier if ping is not None else 1 if good else 3, not good, salted_key(salt, span.peer_id)


def cap_servers(
    crawl: ModelCrawl,
    max_servers: int,
    pings: Mapping[str, PingResult] | None = None,
    known_good: Collection[str] = frozenset(),
    salt: bytes = b"",
) -> None:
    """Keep at most `max_servers` of a model's servers, verified ones first (`verified_rank`)."""
    if len(crawl.spans) <= max_servers:
        return
    pings = pings or {}
    ranked = sorted(crawl.spans.values(), key=lambda s: verified_rank(s, pings, known_good, salt))
    crawl.capped_servers = len(ranked) - max_servers
    crawl.spans = {span.peer_id: span for span in ranked[:max_servers]}
    logger.warning(
        "Model %s: kept %d servers, dropped %d more", crawl.target.dht_prefix, max_servers, crawl.capped_servers
    )


def _has_reachable_server(crawl: ModelCrawl, pings: Mapping[str, PingResult]) -> bool:
    return any((ping := pings.get(peer)) is not None and ping.reachable for peer in crawl.spans)


def finish_crawl(
    dht: DHT,
    started_at: float,
    targets: list[ModelTarget],
    results: list[PartResult],
    initial_peers: list[str],
    options: CrawlOptions,
    cache: PingCache | None,
    *,
    known_good: KnownGood = KnownGood(),
    salt: bytes = b"",
    invalid_index_entries: int = 0,
    skipped_models: int = 0,
) -> CrawlResult:
    """Merge the parts, ping what the parts did not (bootstrap peers, servers spanning parts), cap each
    model's servers by what was verified, and time it. An indexed model is listed only when a server the
    monitor reached holds it."""
    models = merge_parts(targets, results)
    pings: dict[str, PingResult] = {}
    for result in results:
        for peer, ping in result.pings.items():
            if peer not in pings or (ping.reachable and not pings[peer].reachable):
                pings[peer] = ping
    timeouts = 0  # of this process's calls (a part's own were its task's business)
    bootstrap: dict[str, PingResult] = {}
    if options.ping:
        spans = (s for model in models for s in model.spans.values())
        order = dict.fromkeys(s.peer_id for s in ping_order(spans, known_good.peers, salt))
        todo = [peer for peer in order if peer not in pings]
        more, bootstrap, more_timeouts = ping_peers(
            dht,
            todo,
            bootstrap_peer_ids(initial_peers),
            options,
            cache,
            max_pings=max(options.max_pings - len(pings), 0),
        )
        pings.update(more)
        timeouts += more_timeouts
    listed = [m for m in models if m.target.official or _has_reachable_server(m, pings)]
    skipped_models += len(models) - len(listed)
    for model in listed:
        cap_servers(model, options.max_servers_per_model, pings, known_good.peers, salt)
    kept = {s.peer_id for model in listed for s in model.spans.values()}
    online = {s.peer_id for model in listed for s in model.spans.values() if s.state == ServerState.ONLINE}
    return CrawlResult(
        started_at=started_at,
        duration=time.time() - started_at,
        models=listed,
        pings={peer: ping for peer, ping in pings.items() if peer in kept},
        bootstrap=bootstrap,
        invalid_index_entries=invalid_index_entries,
        skipped_models=skipped_models,
        unchecked_servers=len(online - pings.keys()),
        dht_timeouts=timeouts,
    )


def discover_targets(
    dht: DHT,
    configured: list[ModelTarget],
    options: CrawlOptions,
    known_good: KnownGood = KnownGood(),
    salt: bytes = b"",
) -> tuple[list[ModelTarget], int, int]:
    """Configured models plus the indexed ones worth crawling (`choose_targets`): (targets, invalid index
    entries, skipped models)."""
    index, invalid = dht_result(fetch_model_index(dht, wait=False), options.dht_timeout, "reading the model index")
    targets, skipped = choose_targets(
        configured,
        index,
        max_custom_models=options.max_custom_models,
        max_num_blocks=options.max_num_blocks,
        verified=known_good.models,
        salt=salt,
    )
    return targets, invalid, skipped


def run_crawl(
    dht: DHT,
    configured: list[ModelTarget],
    initial_peers: list[str],
    options: CrawlOptions,
    cache: PingCache | None = None,
    known_good: KnownGood = KnownGood(),
) -> CrawlResult:
    """A whole crawl in this process: model index, every model's blocks, pings."""
    started_at = time.time()
    salt = new_salt()
    targets, invalid_index, skipped = discover_targets(dht, configured, options, known_good, salt)
    results = fetch_parts(dht, plan_parts(targets, options.blocks_per_part), options.dht_timeout)
    return finish_crawl(
        dht,
        started_at,
        targets,
        results,
        initial_peers,
        options,
        cache,
        known_good=known_good,
        salt=salt,
        invalid_index_entries=invalid_index,
        skipped_models=skipped,
    )
