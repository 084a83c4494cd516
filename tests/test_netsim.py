"""The simulated slow link (swarm.netsim): delays each direction as a pipeline, keeps bytes intact, closes cleanly.

Delays are checked as lower bounds measured here (the proxy must never be faster than its link)
and as orderings of events (chunks in flight together arrive before a reply could come back).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from swarm.netsim import READY_MARK, Link, LinkProxy, ProxyThread

ROOT = Path(__file__).resolve().parent.parent


class Target:
    """A TCP server on a thread of its own: records when each chunk arrives; echoes, or answers the first chunk."""

    def __init__(self, mode: str = "echo"):
        self.mode = mode
        self.arrivals: list[tuple[float, bytes]] = []
        self.got_eof = threading.Event()
        self._changed = threading.Condition()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        connection, _ = self._listener.accept()
        with connection:
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while chunk := connection.recv(1 << 16):
                with self._changed:
                    self.arrivals.append((time.monotonic(), chunk))
                    self._changed.notify_all()
                if self.mode == "echo":
                    connection.sendall(chunk)
                elif len(self.arrivals) == 1:  # "ack": one reply to the first chunk
                    connection.sendall(b"ack")
            self.got_eof.set()

    def received(self) -> bytes:
        return b"".join(chunk for _, chunk in self.arrivals)

    def wait_for(self, size: int, timeout: float = 30) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: len(self.received()) >= size, timeout), "bytes never arrived"

    def close(self) -> None:
        self._listener.close()


@pytest.fixture
def proxies() -> Iterator[ProxyThread]:
    with ProxyThread() as thread:
        yield thread


def connect(proxy: LinkProxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def receive_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"the connection closed after {len(data)} of {size} bytes"
        data += chunk
    return bytes(data)


def wait_until(predicate, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "the condition never came true"
        time.sleep(0.001)


def test_bytes_arrive_intact_both_ways_and_no_sooner_than_the_link_allows(proxies: ProxyThread) -> None:
    target = Target("echo")
    delay = 0.05
    proxy = proxies.add(("127.0.0.1", target.port), Link(delay))
    payload = os.urandom(3 << 20)  # many chunks each way
    with connect(proxy) as sock:
        began = time.monotonic()
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        echoed = receive_exactly(sock, len(payload))
        round_trip = time.monotonic() - began
        sender.join()
        first_arrival = target.arrivals[0][0]
    assert echoed == payload
    assert target.received() == payload
    assert first_arrival - began >= delay  # one way
    assert round_trip >= 2 * delay  # there and back
    assert proxy.bytes_read == {"up": len(payload), "down": len(payload)}
    target.close()


def test_chunks_in_flight_together_are_delayed_once_not_one_after_another(proxies: ProxyThread) -> None:
    # Four chunks, each sent once the proxy has read the one before (so it holds them separately), all
    # within the first chunk's delay. A pipelined link delivers them all before the answer to the first
    # could come back; a link that slept `delay` per chunk in turn would deliver the third after it.
    target = Target("ack")
    delay = 0.5
    proxy = proxies.add(("127.0.0.1", target.port), Link(delay))
    with connect(proxy) as sock:
        began = time.monotonic()
        for index in range(4):
            sock.sendall(bytes([index]) * 100)
            wait_until(lambda index=index: proxy.bytes_read["up"] == 100 * (index + 1))
        assert not target.arrivals, "the proxy let a chunk through before its delay"
        assert receive_exactly(sock, 3) == b"ack"
        answered = time.monotonic()
    target.wait_for(400)
    assert target.received() == b"".join(bytes([i]) * 100 for i in range(4))  # in order
    assert target.arrivals[-1][0] < answered  # the last chunk was there before the answer to the first got back
    assert answered - began >= 2 * delay
    assert all(arrived - began >= delay for arrived, _ in target.arrivals)
    target.close()


def test_bandwidth_limit_spreads_a_burst(proxies: ProxyThread) -> None:
    target = Target("record")
    bandwidth = 1 << 20  # 1 MiB/s
    payload = os.urandom(256 << 10)
    proxy = proxies.add(("127.0.0.1", target.port), Link(0.0, bandwidth))
    with connect(proxy) as sock:
        began = time.monotonic()
        sock.sendall(payload)
        target.wait_for(len(payload))
        finished = target.arrivals[-1][0]
    assert target.received() == payload
    assert finished - began >= len(payload) / bandwidth * 0.95  # the first read may already hold a full chunk


def test_half_close_passes_through_and_the_target_closing_closes_the_client(proxies: ProxyThread) -> None:
    target = Target("echo")
    proxy = proxies.add(("127.0.0.1", target.port), Link(0.02))
    with connect(proxy) as sock:
        sock.sendall(b"last words")
        sock.shutdown(socket.SHUT_WR)
        assert target.got_eof.wait(30), "the target never saw the client's end of stream"
        assert receive_exactly(sock, 10) == b"last words"  # the answer still comes back after the half-close
        assert sock.recv(1) == b""  # then the target's close arrives too
    target.close()


def test_a_target_that_is_down_closes_the_client_connection(proxies: ProxyThread) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # nothing listens here once it is closed
    proxy = proxies.add(("127.0.0.1", port), Link(0.01))
    with connect(proxy) as sock:
        assert sock.recv(1) == b""


def test_the_command_runs_a_proxy_process_and_stops_on_sigint() -> None:
    target = Target("echo")
    process = subprocess.Popen(
        [sys.executable, "-m", "swarm.netsim", f"0:127.0.0.1:{target.port}", "--delay", "0.02"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = process.stdout.readline()
        assert line.startswith(READY_MARK), line
        port = int(line.split()[3].rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"hello")
            assert receive_exactly(sock, 5) == b"hello"
        process.send_signal(2)
        assert process.wait(30) == 0
    finally:
        process.kill()
        process.wait()
        target.close()


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        Link(-1.0)
    with pytest.raises(ValueError):
        Link(0.01, 0)
    result = subprocess.run(
        [sys.executable, "-m", "swarm.netsim", "not-a-route"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "LISTEN_PORT:TARGET_HOST:TARGET_PORT" in result.stderr
