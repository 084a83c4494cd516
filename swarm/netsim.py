"""A simulated slow network for benchmarks and tests: a userspace TCP proxy that delays each direction.

    python -m swarm.netsim --delay 0.01 [--bandwidth BYTES_PER_S] LISTEN_PORT:TARGET_HOST:TARGET_PORT ...

A block server listens on its real port and announces only its proxy's address, so every
connection to it crosses a link with `delay` seconds one way (and, optionally, a bandwidth limit):
a swarm on one machine then behaves like servers tens of milliseconds apart.

The delay is a pipeline delay, as on a real link: each chunk is written `delay` after it was
read, however many chunks are in flight, not `delay` after the previous chunk was written.
With a bandwidth limit a chunk also waits for the link to carry the chunks before it.
Run the proxy in its own process (the command above, or `LocalSwarm.start_server(link_delay=...)`)
or at least its own thread (`ProxyThread`), so the process under test cannot hold up its timers.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from functools import partial

CHUNK_BYTES = 1 << 16
MAX_BUFFERED_BYTES = 16 << 20  # bytes read but not yet written, per direction: stop reading beyond this
READY_MARK = "netsim listening on"


@dataclasses.dataclass(frozen=True)
class Link:
    """One direction's properties: one-way delay in seconds, and bytes per second (None: unlimited)."""

    delay: float = 0.0
    bandwidth: float | None = None

    def __post_init__(self) -> None:
        if self.delay < 0:
            raise ValueError("the delay must be >= 0")
        if self.bandwidth is not None and self.bandwidth <= 0:
            raise ValueError("the bandwidth must be > 0 bytes/s (or None for unlimited)")


class _Pipe:
    """One direction of one connection: read chunks, hold each until its release time, write them in order."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: Link, count: Callable[[int], None]
    ) -> None:
        self.reader, self.writer, self.link = reader, writer, link
        self._count = count  # called with each chunk's size as it is read
        self._queue: collections.deque[tuple[float, bytes]] = collections.deque()  # (release time, chunk); b"": EOF
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._buffered = 0
        self._link_free_at = 0.0  # when the (bandwidth-limited) link has sent everything queued so far

    async def read_side(self) -> None:
        try:
            while True:
                await self._room.wait()
                chunk = await self.reader.read(CHUNK_BYTES)
                self._count(len(chunk))
                self._put(chunk)
                if not chunk:
                    return
        except (ConnectionError, OSError):
            self._put(b"")

    def _put(self, chunk: bytes) -> None:
        now = time.monotonic()
        sent = now
        if self.link.bandwidth is not None and chunk:
            self._link_free_at = max(self._link_free_at, now) + len(chunk) / self.link.bandwidth
            sent = self._link_free_at
        self._queue.append((sent + self.link.delay, chunk))
        self._buffered += len(chunk)
        if self._buffered >= MAX_BUFFERED_BYTES:
            self._room.clear()
        self._arrived.set()

    async def write_side(self) -> None:
        """Write each chunk at its release time; end our side of the connection after the EOF is released."""
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            release, chunk = self._queue.popleft()
            # Sleep the remainder only: chunks read while an earlier one waited are not delayed twice.
            while (left := release - time.monotonic()) > 0:
                await asyncio.sleep(left)
            if not chunk:
                with contextlib.suppress(OSError, RuntimeError):
                    if self.writer.can_write_eof():
                        self.writer.write_eof()
                return
            self._buffered -= len(chunk)
            if self._buffered < MAX_BUFFERED_BYTES:
                self._room.set()
            self.writer.write(chunk)
            await self.writer.drain()


class LinkProxy:
    """Accepts connections on a local port and forwards each to `target`, through `up` and `down` links.

    `up` delays bytes travelling to the target, `down` bytes coming back. Runs on the current event loop.
    """

    def __init__(
        self,
        target: tuple[str, int],
        up: Link,
        down: Link | None = None,
        listen: tuple[str, int] = ("127.0.0.1", 0),
    ):
        self.target, self.up, self.down = target, up, down if down is not None else up
        self.listen = listen
        self.connections = 0  # accepted so far
        self.bytes_read = {"up": 0, "down": 0}  # read from either side so far (written `delay` later)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> LinkProxy:
        self._server = await asyncio.start_server(self._accept, *self.listen)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            target_reader, target_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()  # the target is down: the client sees the connection closed
            self._tasks.discard(task)
            return
        for writer in (client_writer, target_writer):
            _no_delay(writer)
        pipes = (
            _Pipe(client_reader, target_writer, self.up, partial(self._count, "up")),
            _Pipe(target_reader, client_writer, self.down, partial(self._count, "down")),
        )
        try:
            # Both directions run until each has passed its EOF on; a reset on either side ends both.
            parts = [asyncio.ensure_future(part) for pipe in pipes for part in (pipe.read_side(), pipe.write_side())]
            try:
                await asyncio.gather(*parts)
            except (ConnectionError, OSError, asyncio.CancelledError):
                pass  # a reset, or the proxy is closing: either way this connection is over
            finally:
                for part in parts:
                    part.cancel()
                await asyncio.gather(*parts, return_exceptions=True)
        finally:
            for writer in (client_writer, target_writer):
                writer.close()
            self._tasks.discard(task)

    def _count(self, direction: str, size: int) -> None:
        self.bytes_read[direction] += size


def _no_delay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A loop whose timers fire within microseconds: epoll (the default) waits in whole milliseconds,
    rounded up, which would add up to 1 ms to every delay; select() takes microseconds. A proxy
    watches few sockets, so select()'s cost per socket does not matter."""
    return asyncio.SelectorEventLoop(selectors.SelectSelector())


class ProxyThread:
    """Link proxies on an event loop of their own thread; for tests (processes under test start `main`)."""

    def __init__(self) -> None:
        self._loop = new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="netsim", daemon=True)
        self._thread.start()
        self.proxies: list[LinkProxy] = []

    def add(self, target: tuple[str, int], up: Link, down: Link | None = None) -> LinkProxy:
        proxy = LinkProxy(target, up, down)
        asyncio.run_coroutine_threadsafe(proxy.start(), self._loop).result(10)
        self.proxies.append(proxy)
        return proxy

    def close(self) -> None:
        if self._loop.is_closed():
            return

        async def close_all() -> None:
            await asyncio.gather(*(proxy.close() for proxy in self.proxies))

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close_all(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> ProxyThread:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _parse_route(text: str) -> tuple[int, tuple[str, int]]:
    """'LISTEN_PORT:HOST:PORT' -> (listen port, (host, port))."""
    try:
        listen, host, port = text.rsplit(":", 2)
        return int(listen), (host, int(port))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LISTEN_PORT:TARGET_HOST:TARGET_PORT, got {text!r}") from None


async def _serve(routes: list[tuple[int, tuple[str, int]]], link: Link, host: str) -> None:
    proxies = [await LinkProxy(target, link, listen=(host, port)).start() for port, target in routes]
    for proxy in proxies:
        # The line a parent waits for (LocalSwarm): the port may have been chosen by the system (0).
        print(f"{READY_MARK} {host}:{proxy.port} -> {proxy.target[0]}:{proxy.target[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await asyncio.gather(*(proxy.close() for proxy in proxies))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("routes", nargs="+", type=_parse_route, help="LISTEN_PORT:TARGET_HOST:TARGET_PORT (0: any)")
    parser.add_argument("--delay", type=float, default=0.0, help="one-way delay in seconds, each direction")
    parser.add_argument("--bandwidth", type=float, default=None, help="bytes per second, each direction")
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    args = parser.parse_args(argv)
    try:
        link = Link(args.delay, args.bandwidth)
    except ValueError as e:
        parser.error(str(e))
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(_serve(args.routes, link, args.host))


if __name__ == "__main__":
    sys.exit(main())
