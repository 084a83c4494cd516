"""DHT processes start from a clean process, not as a fork of their owner: a lock that another of the
owner's threads holds at that moment (a log handler's queue, a stream mid-write) must not reach the child."""

from __future__ import annotations

import logging
import logging.handlers
import multiprocessing
import os
import queue
import threading
from collections.abc import Iterator

import pytest
from hivemind.utils import mpfuture

from swarm.dht import OwnedDHT
from swarm.process_locks import DeathProofLock

START_WITHIN = 60.0  # a bound, not a timing: a DHT starts in seconds, a hung one never
FORK = multiprocessing.get_context("fork")


@pytest.fixture
def queue_held_by_another_thread() -> Iterator[queue.Queue]:
    """A log queue whose mutex another thread holds, as a thread putting a record at that instant would."""
    records: queue.Queue = queue.Queue()
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with records.mutex:
            holding.set()
            release.wait()

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert holding.wait(10)
    try:
        yield records
    finally:
        release.set()
        holder.join(10)


def start_dht() -> OwnedDHT:
    return OwnedDHT(
        initial_peers=[], client_mode=False, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start_timeout=START_WITHIN
    )


def test_a_dht_starts_and_answers_while_another_thread_holds_a_lock_its_process_would_need(
    queue_held_by_another_thread,
):
    # The DHT process logs as it launches its p2pd; a forked one would log through this handler, whose queue
    # it would find locked by a thread that does not exist in it: it would never be ready.
    launcher = logging.getLogger("hivemind.p2p.p2p_daemon")
    handler = logging.handlers.QueueHandler(queue_held_by_another_thread)
    saved_level = launcher.level
    launcher.addHandler(handler)
    launcher.setLevel(logging.DEBUG)
    try:
        dht = start_dht()
    finally:
        launcher.removeHandler(handler)
        launcher.setLevel(saved_level)
    try:
        assert dht.peer_id is not None
        assert dht.get("nothing-stored-here") is None  # it answers
    finally:
        dht.shutdown()
    assert not dht.is_alive()


def start_and_stop_a_dht(done) -> None:
    dht = start_dht()
    try:
        done.put(dht.peer_id.to_base58())
    finally:
        dht.shutdown()


def test_a_forked_child_of_an_owner_starts_a_dht_of_its_own():
    """The monitor starts a DHT afresh in a forked child (a Celery pool process): the child cannot use the
    fork server of its parent, which is not its child."""
    owner_dht = start_dht()
    try:
        done = FORK.Queue()
        child = FORK.Process(target=start_and_stop_a_dht, args=(done,))
        child.start()
        try:
            peer_id = done.get(timeout=START_WITHIN)
        finally:
            child.join(START_WITHIN)
        assert child.exitcode == 0
        assert peer_id != owner_dht.peer_id.to_base58()
    finally:
        owner_dht.shutdown()


async def _update_lock_file(dht, node) -> tuple[int, int]:
    lock = mpfuture.MPFuture._update_lock
    with lock:  # opens this process's own description of the lock's file
        pass
    status = os.fstat(lock._local()[1])
    return status.st_dev, status.st_ino


def test_a_dht_process_shares_its_owners_future_locks():
    """Its results reach the owner through a pipe other DHT processes of the owner write to as well."""
    dht = start_dht()
    try:
        in_dht = dht.run_coroutine(_update_lock_file)
    finally:
        dht.shutdown()
    lock = mpfuture.MPFuture._update_lock
    assert isinstance(lock, DeathProofLock)
    status = os.fstat(lock._local()[1])
    assert in_dht == (status.st_dev, status.st_ino)
