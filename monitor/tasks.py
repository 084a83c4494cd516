"""Celery tasks: a crawl every MONITOR_UPDATE_PERIOD seconds, fanned out over the workers, and pruning.

`crawl_swarm` reads the model index and splits the crawl into parts (a model, or a block range of a
large model); a chord runs `crawl_part` for each on any worker and then `save_crawl` once, which
pings what is left and writes the snapshot in one transaction. More workers crawl faster. A worker
that dies mid-crawl leaves the chord unfinished, so nothing is written.

Servers and indexed models are ranked by what earlier crawls verified (`known_good`: servers that answered
the monitor's pings in the latest MONITOR_KNOWN_GOOD_CRAWLS snapshots), never by what they announce; one
random salt per crawl orders the rest the same way in every part of it.

A wedged DHT must not wedge a worker: every call into it has a timeout (MONITOR_DHT_TIMEOUT). A read that
times out fails the task; pings that time out leave their servers unchecked and the crawl is still saved.
Either way the process starts a new DHT client for its next task. Every task has soft and
hard time limits (MONITOR_TASK_SOFT_TIME_LIMIT, MONITOR_TASK_TIME_LIMIT). A worker process killed at its
hard limit takes its DHT process and p2pd with it (swarm.dht.OwnedDHT).

Crawls never overlap: `crawl_swarm` takes the crawl lock (an `add` to Django's cache, which every process
of the site shares: Redis, where `add` is atomic, or a folder in the embedded mode, where a file lock makes
it so) and `save_crawl` releases it once the snapshot is written. A beat tick while a crawl runs is logged
and does nothing. A crawl that dies on the way (a part failed, a worker was killed) leaves the lock to
expire after MONITOR_TASK_TIME_LIMIT.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from celery import chord, shared_task
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_shutdown
from django.core.cache import cache, caches
from django.core.cache.backends.filebased import FileBasedCache
from django.db import DatabaseError

from monitor import conf, swarm_client
from monitor.crawl import (
    DHTTimeoutError,
    FetchPart,
    KnownGood,
    PartResult,
    discover_targets,
    fetch_part_and_ping,
    finish_crawl,
    new_salt,
    plan_parts,
)
from monitor.models import ServerObservation, Snapshot
from monitor.snapshots import prune_history as prune_snapshots
from monitor.snapshots import write_snapshot
from monitor.targets import ModelTarget

logger = logging.getLogger(__name__)


SOFT_TIME_LIMIT, TIME_LIMIT = conf.task_time_limits()
CRAWL_LOCK = "monitor:crawl-lock"


def acquire_crawl_lock(seconds: float = TIME_LIMIT) -> str | None:
    """A token that holds the crawl lock for at most `seconds`, or None while another crawl holds it."""
    token = secrets.token_hex(8)
    with _exclusive_cache():
        return token if cache.add(CRAWL_LOCK, token, timeout=seconds) else None


def release_crawl_lock(token: str) -> None:
    """Let the next crawl start, unless the lock expired and a later crawl took it (not ours to free)."""
    try:
        with _exclusive_cache():
            if token and cache.get(CRAWL_LOCK) == token:
                cache.delete(CRAWL_LOCK)
    except Exception as e:  # the crawl's own outcome matters more; the lock expires anyway
        logger.warning("Could not release the crawl lock (it expires in %g s): %s", TIME_LIMIT, e)


@contextlib.contextmanager
def _exclusive_cache() -> Iterator[None]:
    """One process at a time between the lock's read and write in a folder cache: its `add` is a check
    then a write, so two workers could both take the lock. Redis's `add` is atomic on its own."""
    backend = caches["default"]
    if not isinstance(backend, FileBasedCache):
        yield
        return
    folder = Path(backend._dir)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "crawl-lock.flock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        yield


def _monitor_task(name: str) -> Callable:
    """A Celery task with the monitor's time limits, which leaves the swarm when the DHT stopped answering."""

    def decorate(function: Callable) -> Callable:
        @functools.wraps(function)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return function(*args, **kwargs)
            except (DHTTimeoutError, SoftTimeLimitExceeded):
                logger.warning("%s: the DHT client of this process is dropped; the next task starts a new one", name)
                swarm_client.shutdown()
                raise

        return shared_task(name=name, soft_time_limit=SOFT_TIME_LIMIT, time_limit=TIME_LIMIT)(run)

    return decorate


def _dht():
    return swarm_client.get_dht(conf.initial_peers())


def _ping_cache():
    return swarm_client.ping_cache(conf.ping_cache_seconds())


def known_good(crawls: int | None = None) -> KnownGood:
    """Servers that answered the monitor's own pings in the latest `crawls` snapshots, and per model how
    many distinct ones: the only servers a flood of strangers' announcements cannot push out."""
    crawls = conf.known_good_crawls() if crawls is None else crawls
    try:
        recent = list(Snapshot.objects.order_by("-created_at", "-pk").values_list("pk", flat=True)[: max(crawls, 0)])
        pairs = list(
            ServerObservation.objects.filter(snapshot_id__in=recent, reachable=True)
            .values_list("dht_prefix", "peer_id")
            .distinct()
        )
    except DatabaseError as e:  # history only orders the crawl: without it, every server is a stranger
        logger.warning("Crawling without the known-good servers: the history cannot be read (%s)", e)
        pairs = []
    peers: set[str] = set()
    models: dict[str, int] = {}
    for prefix, peer in pairs:
        peers.add(peer)
        models[prefix] = models.get(prefix, 0) + 1
    return KnownGood(frozenset(peers), models)


def _drop_dht_if_timed_out(timeouts: int) -> None:
    """Pings that timed out were survived, but the DHT process may be wedged: the next task starts anew."""
    if timeouts:
        logger.warning("%d calls into the DHT timed out: the next task starts a new DHT client", timeouts)
        swarm_client.shutdown()


@_monitor_task("monitor.tasks.crawl_swarm")
def crawl_swarm() -> str | None:
    """Start a crawl; returns the id of the task that will save it (its result: the snapshot's summary), or
    None when the previous crawl is still running."""
    lock = acquire_crawl_lock()
    if lock is None:
        logger.warning("The previous crawl has not finished: this one is skipped")
        return None
    try:
        return _start_crawl(lock)
    except BaseException:  # nothing was sent that would release it
        release_crawl_lock(lock)
        raise


def _start_crawl(lock: str) -> str:
    started_at = time.time()
    options = conf.crawl_options()
    salt = new_salt().hex()  # one per crawl, shared by its parts (Celery messages are not public)
    targets, invalid_index, skipped = discover_targets(
        _dht(), conf.configured_models(), options, known_good(), bytes.fromhex(salt)
    )
    parts = plan_parts(targets, options.blocks_per_part)
    save = save_crawl.s(
        started_at=started_at,
        targets=[target.to_json() for target in targets],
        invalid_index_entries=invalid_index,
        skipped_models=skipped,
        salt=salt,
        lock=lock,
    )
    if not parts:
        return save.delay([]).id
    logger.info("Crawling %d models in %d parts", len(targets), len(parts))
    return chord(crawl_part.s(part.to_json(), salt=salt) for part in parts)(save).id


@_monitor_task("monitor.tasks.crawl_part")
def crawl_part(part: list[Any], salt: str = "") -> dict[str, Any]:
    result = fetch_part_and_ping(
        _dht(), FetchPart.from_json(part), conf.crawl_options(), _ping_cache(), known_good(), bytes.fromhex(salt)
    )
    _drop_dht_if_timed_out(result.dht_timeouts)
    return result.to_json()


@_monitor_task("monitor.tasks.save_crawl")
def save_crawl(
    part_results: list[dict[str, Any]],
    *,
    started_at: float,
    targets: list[dict[str, Any]],
    invalid_index_entries: int = 0,
    skipped_models: int = 0,
    salt: str = "",
    lock: str = "",
) -> dict[str, Any]:
    try:
        return _save_crawl(part_results, started_at, targets, invalid_index_entries, skipped_models, salt)
    finally:
        release_crawl_lock(lock)


def _save_crawl(
    part_results: list[dict[str, Any]],
    started_at: float,
    targets: list[dict[str, Any]],
    invalid_index_entries: int,
    skipped_models: int,
    salt: str,
) -> dict[str, Any]:
    crawl = finish_crawl(
        _dht(),
        started_at,
        [ModelTarget.from_json(target) for target in targets],
        [PartResult.from_json(result) for result in part_results],
        conf.initial_peers(),
        conf.crawl_options(),
        _ping_cache(),
        known_good=known_good(),
        salt=bytes.fromhex(salt),
        invalid_index_entries=invalid_index_entries,
        skipped_models=skipped_models,
    )
    snapshot = write_snapshot(crawl)
    _drop_dht_if_timed_out(crawl.dht_timeouts)
    logger.info("Saved %s: %d servers in %.2f s", snapshot, snapshot.num_servers, snapshot.duration)
    return {
        "snapshot": snapshot.pk,
        "num_servers": snapshot.num_servers,
        "invalid_entries": snapshot.invalid_entries,
        "parts": len(part_results),
        "healthy": {status.dht_prefix: status.healthy for status in snapshot.models.all()},
    }


@_monitor_task("monitor.tasks.prune_history")
def prune_history() -> int:
    deleted = prune_snapshots(conf.retention_seconds())
    logger.info("Pruned %d snapshots older than %d s", deleted, conf.retention_seconds())
    return deleted


@worker_process_shutdown.connect
def _leave_swarm(**kwargs: Any) -> None:
    swarm_client.shutdown()
