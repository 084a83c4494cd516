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
import re
import threading
import time
from collections.abc import Iterable
from functools import partial
from typing import Any

from hivemind import DHT
from hivemind.dht.node import DHTNode

from monitor.conf import CrawlOptions  # (also importable from here, as before)
from monitor.gcpause import paused_gc
from monitor.targets import ModelTarget, choose_targets
from swarm.data_structures import RemoteSpanInfo, ServerInfo, ServerState
from swarm.dht import fetch_model_index, fetch_swarm_in_dht
from swarm.ping import PingResult, ping_dht_peer, ping_server

logger = logging.getLogger(__name__)

PEER_ID = re.compile(r"[1-9A-HJ-NP-Za-km-z]{20,128}")  # base58
# Peer ids per call into the DHT process: hivemind's pipe into it breaks on messages over ~60 KB
# (uvloop makes it non-blocking), and that kills the DHT process.
PING_BATCH = 200


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

    def to_json(self) -> dict[str, Any]:
        """A JSON-able form for Celery results (values are re-validated by `from_json`)."""
        return {
            "part": self.part.to_json(),
            "spans": [[s.peer_id, s.start, s.end, _finite(s.server_info.to_tuple())] for s in self.spans.values()],
            "invalid_entries": self.invalid_entries,
            "pings": {peer: [p.reachable, p.rtt, p.error] for peer, p in self.pings.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PartResult:
        spans = {}
        for peer_id, start, end, value in data["spans"]:
            spans[peer_id] = RemoteSpanInfo(peer_id, start, end, ServerInfo.from_tuple(_infinite(value)))
        pings = {peer: PingResult(*fields) for peer, fields in data["pings"].items()}
        return cls(FetchPart.from_json(data["part"]), spans, data["invalid_entries"], pings)


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
    unchecked_servers: int = 0  # online servers left unpinged by `max_pings`

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
    """Read every part's blocks concurrently, in one call into the DHT process."""
    future = dht.run_coroutine(partial(_fetch_parts_in_dht, parts=parts), return_future=True)
    with paused_gc():  # unpickling thousands of spans
        return dht_result(future, timeout, f"reading {len(parts)} parts")


async def _fetch_parts_in_dht(dht: DHT, node: DHTNode, *, parts: list[FetchPart]) -> list[PartResult]:
    with paused_gc():
        views = await asyncio.gather(
            *(
                fetch_swarm_in_dht(dht, node, prefix=p.dht_prefix, num_blocks=p.num_blocks, start=p.start, end=p.end)
                for p in parts
            )
        )
    return [
        _without_bad_peer_ids(PartResult(part, view.spans, view.invalid_entries)) for part, view in zip(parts, views)
    ]


def _without_bad_peer_ids(result: PartResult) -> PartResult:
    """Peer ids are base58 multihashes; any other subkey is junk (and would end up in URLs and pages)."""
    for peer_id, span in list(result.spans.items()):
        if not PEER_ID.fullmatch(peer_id):
            del result.spans[peer_id]
            result.invalid_entries += max(min(span.end, result.part.end) - max(span.start, result.part.start), 1)
    return result


def fetch_part_and_ping(dht: DHT, part: FetchPart, options: CrawlOptions, cache: PingCache | None) -> PartResult:
    """One fan-out task's work: read a block range, then ping the online servers whose span starts in it."""
    result = fetch_parts(dht, [part], options.dht_timeout)[0]
    if options.ping:
        peers = [s.peer_id for s in ping_order(result.spans.values()) if part.start <= s.start < part.end]
        result.pings, _ = ping_peers(dht, peers[: options.max_pings], [], options, cache)
    return result


def ping_peers(
    dht: DHT, servers: list[str], bootstrap: list[str], options: CrawlOptions, cache: PingCache | None
) -> tuple[dict[str, PingResult], dict[str, PingResult]]:
    """Ping block servers (rpc_info) and bootstrap peers (DHT ping) in parallel; servers seen recently
    are answered from `cache`."""
    cached = cache.fresh(servers) if cache else {}
    missing = list(dict.fromkeys(peer for peer in servers if peer not in cached))
    if not missing and not bootstrap:
        return cached, {}
    batches = [missing[i : i + PING_BATCH] for i in range(0, len(missing), PING_BATCH)] or [[]]
    deadline = time.monotonic() + options.dht_timeout  # for all batches: they run concurrently
    futures = [
        dht.run_coroutine(
            partial(
                _ping_in_dht,
                servers=batch,
                bootstrap=bootstrap if number == 0 else [],
                timeout=options.ping_timeout,
                parallel=options.ping_parallel,
            ),
            return_future=True,
        )
        for number, batch in enumerate(batches)
    ]
    fresh: dict[str, PingResult] = {}
    boot: dict[str, PingResult] = {}
    for future in futures:
        batch_pings, batch_boot = dht_result(future, deadline - time.monotonic(), f"pinging {len(missing)} servers")
        fresh.update(batch_pings)
        boot.update(batch_boot)
    if cache:
        cache.store(fresh)
    return {**cached, **fresh}, boot


_ping_limits: dict[tuple[int, int], asyncio.Semaphore] = {}


async def _ping_in_dht(
    dht: DHT, node: DHTNode, *, servers: list[str], bootstrap: list[str], timeout: float, parallel: int
) -> tuple[dict[str, PingResult], dict[str, PingResult]]:
    # One limit for all batches in flight: they run concurrently in the DHT process's event loop.
    limit = _ping_limits.setdefault((id(asyncio.get_running_loop()), parallel), asyncio.Semaphore(max(parallel, 1)))

    async def ping(peer: str) -> PingResult:
        async with limit:
            return await ping_server(node.p2p, peer, timeout)

    boot = asyncio.gather(*(ping_dht_peer(node, peer, timeout) for peer in bootstrap))
    pings = await asyncio.gather(*(ping(peer) for peer in servers))
    return dict(zip(servers, pings)), dict(zip(bootstrap, await boot))


def ping_order(spans: Iterable[RemoteSpanInfo]) -> list[RemoteSpanInfo]:
    """Online servers, the most useful first (long spans, high throughput): they are pinged first
    when a flood of announcements exceeds the ping budget."""
    online = [span for span in spans if span.state == ServerState.ONLINE]
    return sorted(online, key=lambda s: (-s.length, -s.server_info.throughput, s.peer_id))


# ----- merging -----


def merge_parts(targets: list[ModelTarget], results: Iterable[PartResult], max_servers: int) -> list[ModelCrawl]:
    """Join the parts of each model: a server seen in several parts keeps its highest state and the
    union of its spans."""
    crawls = {target.dht_prefix: ModelCrawl(target, {}) for target in targets}
    for result in results:
        crawl = crawls.get(result.part.dht_prefix)
        if crawl is None:
            continue
        crawl.invalid_entries += result.invalid_entries
        for peer_id, span in result.spans.items():
            known = crawl.spans.get(peer_id)
            if known is None or known.state < span.state:
                crawl.spans[peer_id] = span
            elif known.state == span.state and (span.start < known.start or span.end > known.end):
                start, end = min(known.start, span.start), max(known.end, span.end)
                crawl.spans[peer_id] = dataclasses.replace(known, start=start, end=end)
    for crawl in crawls.values():
        _cap_servers(crawl, max_servers)
    return list(crawls.values())


def _cap_servers(crawl: ModelCrawl, max_servers: int) -> None:
    if len(crawl.spans) <= max_servers:
        return
    ranked = sorted(crawl.spans.values(), key=lambda s: (-s.state, -s.length, -s.server_info.throughput, s.peer_id))
    crawl.capped_servers = len(ranked) - max_servers
    crawl.spans = {span.peer_id: span for span in ranked[:max_servers]}
    logger.warning(
        "Model %s: kept %d servers, dropped %d more", crawl.target.dht_prefix, max_servers, crawl.capped_servers
    )


def finish_crawl(
    dht: DHT,
    started_at: float,
    targets: list[ModelTarget],
    results: list[PartResult],
    initial_peers: list[str],
    options: CrawlOptions,
    cache: PingCache | None,
    *,
    invalid_index_entries: int = 0,
    skipped_models: int = 0,
) -> CrawlResult:
    """Merge the parts, ping what the parts did not (bootstrap peers, servers spanning parts), and time it."""
    models = merge_parts(targets, results, options.max_servers_per_model)
    pings: dict[str, PingResult] = {}
    for result in results:
        for peer, ping in result.pings.items():
            if peer not in pings or (ping.reachable and not pings[peer].reachable):
                pings[peer] = ping
    online = list(dict.fromkeys(s.peer_id for model in models for s in ping_order(model.spans.values())))
    unchecked = 0
    bootstrap: dict[str, PingResult] = {}
    if options.ping:
        budget = max(options.max_pings - len(pings), 0)
        todo = [peer for peer in online if peer not in pings]
        unchecked = max(len(todo) - budget, 0)
        more, bootstrap = ping_peers(dht, todo[:budget], bootstrap_peer_ids(initial_peers), options, cache)
        pings.update(more)
    else:
        unchecked = len(online)
    known = set(online)
    return CrawlResult(
        started_at=started_at,
        duration=time.time() - started_at,
        models=models,
        pings={peer: ping for peer, ping in pings.items() if peer in known},
        bootstrap=bootstrap,
        invalid_index_entries=invalid_index_entries,
        skipped_models=skipped_models,
        unchecked_servers=unchecked,
    )


def discover_targets(
    dht: DHT, configured: list[ModelTarget], options: CrawlOptions
) -> tuple[list[ModelTarget], int, int]:
    """Configured models plus the indexed ones: (targets, invalid index entries, skipped models)."""
    index, invalid = dht_result(fetch_model_index(dht, wait=False), options.dht_timeout, "reading the model index")
    targets, skipped = choose_targets(
        configured, index, max_custom_models=options.max_custom_models, max_num_blocks=options.max_num_blocks
    )
    return targets, invalid, skipped


def run_crawl(
    dht: DHT,
    configured: list[ModelTarget],
    initial_peers: list[str],
    options: CrawlOptions,
    cache: PingCache | None = None,
) -> CrawlResult:
    """A whole crawl in this process: model index, every model's blocks, pings."""
    started_at = time.time()
    targets, invalid_index, skipped = discover_targets(dht, configured, options)
    results = fetch_parts(dht, plan_parts(targets, options.blocks_per_part), options.dht_timeout)
    return finish_crawl(
        dht,
        started_at,
        targets,
        results,
        initial_peers,
        options,
        cache,
        invalid_index_entries=invalid_index,
        skipped_models=skipped,
    )
