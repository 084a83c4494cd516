"""Locks shared by a process and its DHT processes, released when a holder dies.

hivemind's MPFuture guards the pipe that carries results back to a process with one
`multiprocessing.Lock` per program, shared with every DHT process it starts. A DHT process is
stopped with SIGTERM or SIGKILL (its owner shutting it down, the orphan watcher), and one stopped
while it sends a result keeps that lock held forever: every DHT process started afterwards hangs
on its first result, and so does the start of every later DHT in that program. An `flock` is
released by the kernel when its holder dies, so `DeathProofLock` takes its place.

DHT processes are not forks of their owner (swarm.dht.OwnedDHT): the owner's locks travel to them
when they start (`hivemind_locks`, `use_in_hivemind`).
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import threading
from multiprocessing import context, reduction
from typing import Any

from hivemind.utils import mpfuture


class DeathProofLock:
    """A lock between the threads of a process and the processes it starts (as a context manager).

    Threads of one process take a threading lock; processes take an exclusive `flock` on one file,
    each through a descriptor of its own (an `flock` held through an inherited descriptor would be
    shared with the parent, not exclusive). The file is unlinked at once, so nothing is left behind
    however its processes end. A forked process opens it anew through the descriptor it inherited;
    a process being started by spawn or a fork server receives it with the process object (pickling).
    """

    def __init__(self) -> None:
        descriptor, path = tempfile.mkstemp(prefix="swarm-lock-")
        os.unlink(path)
        self._use(descriptor)

    def _use(self, descriptor: int) -> None:
        # Any process that has `descriptor` (this one, its forks) reopens the file through it.
        self._descriptor = descriptor
        self._per_process: dict[int, tuple[threading.Lock, int]] = {os.getpid(): (threading.Lock(), descriptor)}

    def _local(self) -> tuple[threading.Lock, int]:
        pid = os.getpid()
        local = self._per_process.get(pid)
        if local is None:  # first use in a forked process (its parent's entry is not its own)
            local = self._per_process.setdefault(pid, (threading.Lock(), _reopen(self._descriptor)))
        return local

    def __enter__(self) -> DeathProofLock:
        thread_lock, descriptor = self._local()
        thread_lock.acquire()
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        except BaseException:
            thread_lock.release()
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        thread_lock, descriptor = self._local()
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        thread_lock.release()

    def __reduce__(self) -> tuple:
        # Only to a process being started: the descriptor goes along with it (multiprocessing passes it).
        if context.get_spawning_popen() is None:
            raise TypeError("a DeathProofLock can only be passed to a process as it starts")
        return _received, (reduction.DupFd(self._descriptor),)


def _reopen(descriptor: int) -> int:
    """A description of our own of the file open at `descriptor` (unlinked files too)."""
    return os.open(f"/proc/self/fd/{descriptor}", os.O_RDWR)


def _received(duplicate: Any) -> DeathProofLock:
    """The lock in the process it was passed to."""
    received = duplicate.detach()  # shares the sender's description: reopened, so as not to share its flock
    lock = DeathProofLock.__new__(DeathProofLock)
    lock._use(_reopen(received))
    os.close(received)
    return lock


_installed = False


def install_in_hivemind() -> None:
    """Replace MPFuture's program-wide locks (once per program, before any DHT process starts)."""
    global _installed
    if _installed:
        return
    use_in_hivemind((DeathProofLock(), DeathProofLock(), DeathProofLock()))
    _installed = True


def hivemind_locks() -> tuple[Any, Any, Any]:
    """MPFuture's program-wide locks, to pass to a DHT process (`use_in_hivemind` there)."""
    return mpfuture.MPFuture._update_lock, mpfuture.MPFuture._initialization_lock, mpfuture.SharedBytes._lock


def use_in_hivemind(locks: tuple[Any, Any, Any]) -> None:
    """Share the program's locks (`hivemind_locks`) in one of its DHT processes, which writes to its pipes."""
    mpfuture.MPFuture._update_lock, mpfuture.MPFuture._initialization_lock, mpfuture.SharedBytes._lock = locks
