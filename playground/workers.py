"""The threads that run the embedded client's blocking calls (generation, model loading, DHT reads).

Its own module so that every other module can use it without importing generation's machinery.
"""

from __future__ import annotations

import concurrent.futures
import functools

from django.conf import settings


@functools.cache
def executor() -> concurrent.futures.ThreadPoolExecutor:
    """Threads for generation and other blocking client calls; never the ASGI loop's thread."""
    workers = settings.PLAYGROUND_MAX_SESSIONS + 4
    return concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="playground")
