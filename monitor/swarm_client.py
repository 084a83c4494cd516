"""This process's connection to the swarm: one DHT client and one ping cache for the process's lifetime.

Starting hivemind takes seconds, so a Celery worker process (or the web process, for
`is_reachable`) starts its client on first use and keeps it. A forked child never reuses its
parent's client: the DHT runs in a separate process that belongs to the parent.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import threading

from django.conf import settings
from hivemind import DHT
from hivemind.dht.node import DHTNode

from monitor.crawl import PingCache
from swarm.dht import DHT_START_TIMEOUT, OwnedDHT, RelaySettings

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_dht: DHT | None = None
_dht_peers: tuple[str, ...] = ()
_dht_pid = 0
_ping_cache: PingCache | None = None
# Seconds a DHT request of the crawler may take (hivemind's default: 3). A block's value holds every server
# announced there (about 1 MB under a flood); a slower reply counts as a failure, and hivemind then drops
# the peer from its routing table, so that the next crawls read nothing from it ("found 0 servers").
CRAWL_REQUEST_TIMEOUT = 20.0


def get_dht(initial_peers: list[str]) -> DHT:
    """The process's DHT client; started again if the configured peers changed (tests, reconfiguration)."""
    global _dht, _dht_peers, _dht_pid
    peers = tuple(initial_peers)
    with _lock:
        if _dht is not None and (_dht_pid != os.getpid() or _dht_peers != peers or not _dht.is_alive()):
            if _dht_pid == os.getpid():
                _dht.shutdown()
            _dht = None
        if _dht is None:
            if not peers:
                raise RuntimeError("no swarm to watch: set SWARM_INITIAL_PEERS")
            logger.info("Joining the swarm through %s", ", ".join(peers))
            _allow_children()
            _dht = start_dht(list(peers))
            _dht_peers, _dht_pid = peers, os.getpid()
        return _dht


def start_dht(initial_peers: list[str], timeout: float = DHT_START_TIMEOUT) -> DHT:
    """A DHT client tuned for crawling (also used by `crawlswarm`, the benchmark and tests).

    A crawler wants the latest values from the network every time, and must not write as a side effect
    of reading: no local cache of what it read, no caching of it on other nodes."""
    dht = OwnedDHT(  # exits with this process, even a SIGKILLed one (a Celery task past its hard time limit)
        initial_peers=initial_peers,
        relay=RelaySettings(use_relay=getattr(settings, "SWARM_USE_RELAY", True)),
        client_mode=True,
        num_workers=32,
        cache_locally=False,
        cache_nearest=0,
        wait_timeout=CRAWL_REQUEST_TIMEOUT,
        start_timeout=timeout,
    )
    try:
        dht.run_coroutine(_skip_empty_record_validator, return_future=True).result(timeout)
    except BaseException:
        dht.shutdown()
        raise
    return dht


async def _skip_empty_record_validator(dht: DHT, node: DHTNode) -> None:
    # We give hivemind no record validators, so its validator is an empty CompositeValidator that accepts
    # everything; yet reads still re-serialize every subkey twice for it, a third of a large crawl's time.
    # Every value is validated by the monitor itself (ServerInfo.from_tuple).
    node.protocol.record_validator = None


def _allow_children() -> None:
    """Celery's prefork pool runs tasks in daemonic processes, which multiprocessing forbids to start
    children, and the DHT is a child process. It is safe to lift: the DHT is stopped with this process
    (worker_process_shutdown, atexit), and exits on its own when this process is gone (OwnedDHT)."""
    process = multiprocessing.current_process()
    if process.daemon:
        process.daemon = False


def ping_cache(ttl: float) -> PingCache:
    global _ping_cache
    with _lock:
        if _ping_cache is None or _ping_cache.ttl != ttl:
            _ping_cache = PingCache(ttl)
        return _ping_cache


def shutdown() -> None:
    """Leave the swarm (also to start afresh after the DHT stopped answering)."""
    global _dht
    with _lock:
        if _dht is not None and _dht_pid == os.getpid():
            _dht.shutdown()
        _dht = None


atexit.register(shutdown)
