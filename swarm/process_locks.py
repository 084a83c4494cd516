"""Locks shared by a process and the DHT processes it forks, released when a holder dies.

hivemind's MPFuture guards the pipe that carries results back to a process with one
`multiprocessing.Lock` per program, shared with every process forked from it. A DHT process is
stopped with SIGTERM or SIGKILL (its owner shutting it down, the orphan watcher), and one stopped
while it sends a result keeps that lock held forever: every DHT process forked afterwards hangs
on its first result, and so does the start of every later DHT in that program. An `flock` is
released by the kernel when its holder dies, so `DeathProofLock` takes its place.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import threading
from typing import Any

from hivemind.utils import mpfuture


class DeathProofLock:
    """A lock between the threads of a process and the processes forked from it (as a context manager).

    Threads of one process take a threading lock; processes take an exclusive `flock` on one file,
    each through a descriptor of its own (an `flock` held through an inherited descriptor would be
    shared with the parent, not exclusive). The file is unlinked at once, so nothing is left behind
    however its processes end; the others open it through the creator's descriptor in /proc.
    """

    def __init__(self) -> None:
        descriptor, path = tempfile.mkstemp(prefix="swarm-lock-")
        os.unlink(path)
        self._creator = os.getpid()
        self._shared_path = f"/proc/{self._creator}/fd/{descriptor}"  # while the creator lives, as its children do
        self._per_process: dict[int, tuple[threading.Lock, int]] = {self._creator: (threading.Lock(), descriptor)}

    def _local(self) -> tuple[threading.Lock, int]:
        pid = os.getpid()
        local = self._per_process.get(pid)
        if local is None:  # first use in this process (a forked child inherits its parent's entry, not used)
            local = self._per_process.setdefault(pid, (threading.Lock(), os.open(self._shared_path, os.O_RDWR)))
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
