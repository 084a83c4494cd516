"""A bounded pool of bytes for attention (KV) caches.

Each inference session reserves its whole cache up front (batch x max_length x blocks). A
session that does not fit waits up to its `alloc_timeout` for others to finish, then is
refused with a clear error, so one greedy client cannot run the server out of memory.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class CacheAllocationError(RuntimeError):
    pass


class KVCachePool:
    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self.bytes_used = 0
        self._freed: asyncio.Condition | None = None
        self._wakers: set[asyncio.Task] = set()

    @property
    def bytes_left(self) -> int:
        return self.capacity_bytes - self.bytes_used

    @contextlib.asynccontextmanager
    async def reserve(self, nbytes: int, timeout: float) -> AsyncIterator[None]:
        if nbytes > self.capacity_bytes:
            raise CacheAllocationError(
                f"the requested attention cache ({nbytes} bytes) exceeds this server's whole cache "
                f"({self.capacity_bytes} bytes); ask for a smaller max_length or batch"
            )
        if self._freed is None:
            self._freed = asyncio.Condition()
        async with self._freed:
            if nbytes > self.bytes_left:
                try:
                    if timeout <= 0:
                        raise TimeoutError
                    await asyncio.wait_for(self._freed.wait_for(lambda: nbytes <= self.bytes_left), timeout)
                except TimeoutError:
                    raise CacheAllocationError(
                        f"the server's attention cache is full ({self.bytes_left} of {self.capacity_bytes} bytes "
                        f"free, {nbytes} needed); waited {max(timeout, 0.0):.1f} s"
                    ) from None
            self.bytes_used += nbytes
        try:
            yield
        finally:
            # Give the bytes back before any await: a cancellation here must not leak them.
            self.bytes_used -= nbytes
            self._wake_waiters_soon()

    def _wake_waiters_soon(self) -> None:
        async def wake() -> None:
            async with self._freed:
                self._freed.notify_all()

        task = asyncio.get_running_loop().create_task(wake())
        self._wakers.add(task)
        task.add_done_callback(self._wakers.discard)
