"""Locks shared by a process and the DHT processes it forks, released when a holder dies.

hivemind's MPFuture guards the pipe that carries results back to a process with one
`multiprocessing.Lock` per program, shared with every process forked from it. A DHT process is
stopped with SIGTERM or SIGKILL (its owner shutting it down, the orphan watcher), and one stopped
while it sends a result keeps that lock held forever: every DHT process forked afterwards hangs
on its first result, and so does the start of every later DHT in that program. An `flock` is
released by the kernel when its holder dies, so `DeathProofLock` takes its place.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import tempfile
import threading
from typing import Any

from hivemind.utils import mpfuture


class DeathProofLock:
    """A lock between the threads of a process and the processes forked from it (as a context manager).

    Threads of one process take a threading lock; processes take an exclusive `flock` on a file,
    each through a descriptor it opened itself (an `flock` held through an inherited descriptor
    would be shared with the parent, not exclusive).
    """

    def __init__(self) -> None:
        handle, self.path = tempfile.mkstemp(prefix="swarm-lock-")
        os.close(handle)
        creator = os.getpid()
        atexit.register(lambda: os.getpid() == creator and _remove(self.path))
        self._per_process: dict[int, tuple[threading.Lock, int]] = {}

    def _local(self) -> tuple[threading.Lock, int]:
        pid = os.getpid()
        local = self._per_process.get(pid)
        if local is None:  # first use in this process (a forked child inherits its parent's entry, not used)
            local = self._per_process.setdefault(pid, (threading.Lock(), os.open(self.path, os.O_RDWR)))
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


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


_installed = False


def install_in_hivemind() -> None:
    """Replace MPFuture's program-wide locks (once per program, before any DHT process is forked)."""
    global _installed
    if _installed:
        return
    mpfuture.MPFuture._update_lock = DeathProofLock()
    mpfuture.MPFuture._initialization_lock = DeathProofLock()
    mpfuture.SharedBytes._lock = DeathProofLock()
    _installed = True
