"""The locks hivemind's futures share between a process and its DHT processes survive a dead holder."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import threading

import pytest
from hivemind.utils import mpfuture

import swarm.dht  # noqa: F401  (importing it installs the locks)
from swarm.process_locks import DeathProofLock

FORK = multiprocessing.get_context("fork")
# DHT processes are started by the fork server (swarm.dht): the lock travels to them with the process object.
STARTS = [pytest.param(FORK, id="fork"), pytest.param(multiprocessing.get_context("forkserver"), id="forkserver")]


def hold_forever(lock: DeathProofLock, holding) -> None:
    with lock:
        holding.set()
        threading.Event().wait()


def hold_then_release(lock: DeathProofLock, holding, released) -> None:
    with lock:
        holding.set()
        threading.Event().wait(0.5)
        released.set()


def acquired_within(lock: DeathProofLock, seconds: float) -> bool:
    """Takes the lock on a thread, so that a lock held forever fails the test instead of hanging it."""
    taken = threading.Event()

    def take() -> None:
        with lock:
            taken.set()

    threading.Thread(target=take, daemon=True).start()
    return taken.wait(seconds)


def test_hivemind_futures_use_the_death_proof_locks() -> None:
    assert isinstance(mpfuture.MPFuture._update_lock, DeathProofLock)
    assert isinstance(mpfuture.MPFuture._initialization_lock, DeathProofLock)
    assert isinstance(mpfuture.SharedBytes._lock, DeathProofLock)


@pytest.mark.parametrize("start", STARTS)
def test_a_process_killed_while_holding_the_lock_releases_it(start) -> None:
    lock, holding = DeathProofLock(), start.Event()
    child = start.Process(target=hold_forever, args=(lock, holding))
    child.start()
    try:
        assert holding.wait(30)
        assert not acquired_within(lock, 0.5)  # held by the child: excluded
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
        assert acquired_within(lock, 30)
    finally:
        child.kill()
        child.join()


@pytest.mark.parametrize("start", STARTS)
def test_a_process_waits_for_the_holder_to_release(start) -> None:
    lock, holding, released = DeathProofLock(), start.Event(), start.Event()
    child = start.Process(target=hold_then_release, args=(lock, holding, released))
    child.start()
    try:
        assert holding.wait(30)
        with lock:
            assert released.is_set()  # taken only after the child let go
    finally:
        child.join(30)


def test_threads_of_one_process_exclude_each_other() -> None:
    lock = DeathProofLock()
    with lock:
        assert not acquired_within(lock, 0.2)
    assert acquired_within(lock, 5)


def test_the_lock_travels_only_with_a_process_being_started() -> None:
    with pytest.raises(TypeError, match="as it starts"):
        pickle.dumps(DeathProofLock())
