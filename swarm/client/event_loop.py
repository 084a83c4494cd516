"""One background asyncio loop per process for the synchronous client API.

transformers' `generate()` is synchronous while hivemind's P2P is asyncio: client calls hop
onto this loop's thread and wait for the result.
"""

from __future__ import annotations

import asyncio
import atexit
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def background_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="swarm-client-loop", daemon=True)
            thread.start()
            _loop = loop
            atexit.register(_stop, loop)
        return _loop


def _stop(loop: asyncio.AbstractEventLoop) -> None:
    """At exit, cancel what still runs on the loop (open streams, p2p connections) and stop it."""
    if loop.is_closed() or not loop.is_running():
        return

    try:
        asyncio.run_coroutine_threadsafe(cancel_other_tasks(), loop).result(5)
    except Exception:
        pass
    loop.call_soon_threadsafe(loop.stop)


async def cancel_other_tasks() -> None:
    """Cancel every other task of the running loop and wait for them to finish.

    hivemind's p2p objects keep control-connection tasks; left pending, they make the objects'
    destructors try to cancel them later from another thread, which fails noisily.
    """
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def run_sync(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run `coro` on the background loop and wait for its result (from any other thread)."""
    loop = background_loop()
    if _running_on(loop):
        raise RuntimeError("run_sync was called from the client's own event loop")
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)


def _running_on(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
