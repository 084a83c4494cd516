"""Limits on what one client can make the site hold: request bodies are refused (413) while they arrive,
by a real daphne, before anything reads them whole; the APIs answer a too-big body with their own
JSON error; per-client limits count an IPv6 client by its /64."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.test import override_settings

from config.bodies import BodyLimit
from config.proxy import client_key
from config.throttle import ProbeLimiter, TooManyProbes
from playground.admission import Admission
from playground.errors import LimitExceeded
from swarm.local_swarm import SwarmProcess
from tests.conftest import ROOT

LIMIT = 64 * 1024  # the site's MAX_REQUEST_BODY_BYTES in these tests


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[tuple[str, int]]:
    """daphne serving the site (no swarm needed: nothing here generates); (host, port)."""
    tmp = tmp_path_factory.mktemp("limits")
    env = {
        "DEBUG": "1",
        "PYTHONPATH": str(ROOT),
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "VAR_DIR": str(tmp),
        "MAX_REQUEST_BODY_BYTES": str(LIMIT),
        "SWARM_INITIAL_PEERS": "",
    }
    daphne = str(Path(sys.executable).parent / "daphne")
    argv = [daphne, "-e", "tcp:port=0:interface=127.0.0.1", "config.asgi:application"]
    server = SwarmProcess("daphne", argv, env, tmp / "daphne.log")
    try:
        line = server.wait_for_line(lambda line: "Listening on TCP address" in line, timeout=120)
        yield "127.0.0.1", int(line.rsplit(":", 1)[1])
    finally:
        server.stop(timeout=15)


def _connect(site: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(site, timeout=30)  # a hang (the whole body awaited) fails the test
    return sock


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed without an answer: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def test_daphne_refuses_a_declared_too_big_body_before_it_arrives(site):
    """10 MiB announced, 100 bytes sent: the answer comes at once (today daphne waits for the rest)."""
    with _connect(site) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 10485760\r\n\r\n" + b"{" * 100
        )
        status, headers, body = _read_response(sock)
    assert status == 413 and headers["content-type"] == "application/json"
    error = json.loads(body)["error"]  # OpenAI's error shape under /v1/
    assert error["code"] == "request_too_large" and error["type"] == "invalid_request_error"
    assert f"({LIMIT} bytes)" in error["message"]


def test_daphne_refuses_a_chunked_body_once_it_passes_the_limit(site):
    """A chunked body has no declared length: it is counted as it comes and refused mid-way."""
    with _connect(site) as sock:
        sock.sendall(
            b"POST /api/v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        piece = b"x" * 16384
        for _ in range(LIMIT // len(piece) + 1):  # just past the limit; the body never ends
            sock.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
        status, _, body = _read_response(sock)
    assert status == 413
    assert json.loads(body) == {
        "ok": False,
        "traceback": f"the request body is larger than this site accepts ({LIMIT} bytes)",
    }


def test_a_client_that_sends_its_whole_too_big_body_first_reads_the_answer(site):
    host, port = site
    request = urllib.request.Request(
        f"http://{host}:{port}/v1/chat/completions",
        data=b" " * (LIMIT + 1000),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 413
    assert json.loads(refused.value.read())["error"]["code"] == "request_too_large"


def test_bodies_under_the_limit_reach_the_application(site):
    host, port = site
    for data in (b"{not json", b" " * (LIMIT - 10) + b"{"):
        request = urllib.request.Request(
            f"http://{host}:{port}/v1/chat/completions", data=data, headers={"Content-Type": "application/json"}
        )
        with pytest.raises(urllib.error.HTTPError) as answered:
            urllib.request.urlopen(request, timeout=30)
        assert answered.value.code == 400
        assert json.loads(answered.value.read())["error"]["message"] == "the request body is not valid JSON"
    # The connection is kept for the next request when nothing was refused.
    with _connect(site) as sock:
        for _ in range(2):
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            status, _, body = _read_response(sock)
            assert status == 200 and json.loads(body)["object"] == "list"


# ----- the same cap as ASGI middleware (servers that stream bodies to the application) -----


def _call(middleware: BodyLimit, scope: dict, messages: list[dict]) -> tuple[list[dict], list[dict]]:
    """(messages the application received, messages sent to the client)."""
    received, sent, incoming = [], [], list(messages)

    async def receive() -> dict:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    async def app(scope, receive, send) -> None:
        while True:
            message = await receive()
            received.append(message)
            if message["type"] == "http.disconnect" or not message.get("more_body"):
                break
        received.append(await receive())  # Django listens for the client leaving afterwards
        await send({"type": "http.response.start", "status": 200, "headers": []})

    middleware.app = app
    asyncio.run(middleware(scope, receive, send))
    return received, sent


def test_the_asgi_middleware_refuses_big_bodies_and_passes_small_ones_whole():
    middleware = BodyLimit(None, limit=10)
    scope = {"type": "http", "path": "/v1/chat/completions", "headers": [(b"content-length", b"11")]}
    received, sent = _call(middleware, scope, [{"type": "http.request", "body": b"x" * 11}])
    assert received == [] and sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["error"]["code"] == "request_too_large"

    chunks = [{"type": "http.request", "body": b"xxxx", "more_body": True} for _ in range(3)]
    received, sent = _call(middleware, {"type": "http", "path": "/api/v1/generate", "headers": []}, chunks)
    assert received == [] and sent[0]["status"] == 413 and json.loads(sent[1]["body"])["ok"] is False

    chunks = [{"type": "http.request", "body": b"abc", "more_body": True}, {"type": "http.request", "body": b"de"}]
    received, sent = _call(middleware, {"type": "http", "path": "/", "headers": []}, chunks)
    assert received == [{"type": "http.request", "body": b"abcde", "more_body": False}, {"type": "http.disconnect"}]
    assert sent[0]["status"] == 200


# ----- Django's own cap: the APIs' JSON errors -----


@override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=100)
def test_a_too_big_body_is_a_413_json_error_in_each_apis_shape(client):
    body = json.dumps({"model": "demo", "messages": [{"role": "user", "content": "x" * 200}]})
    response = client.post("/v1/chat/completions", body, content_type="application/json")
    assert response.status_code == 413  # was a 500 ("internal error")
    error = response.json()["error"]
    assert error["code"] == "request_too_large" and error["type"] == "invalid_request_error"
    assert "(100 bytes)" in error["message"]

    response = client.post("/api/v1/generate", body, content_type="application/json")
    assert response.status_code == 413 and response.json()["ok"] is False


# ----- per-client limits: an IPv6 client is its /64 -----


def test_client_keys_group_ipv6_by_its_64():
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:ffff:1:2:3") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("::ffff:198.51.100.7") == "198.51.100.7"  # an IPv4 client through an IPv6 socket
    assert client_key("198.51.100.7") == "198.51.100.7" and client_key("unknown") == "unknown"
    assert client_key("fe80::1%eth0") == "fe80::/64"


@override_settings(PLAYGROUND_SESSIONS_PER_CLIENT=2, PLAYGROUND_MAX_SESSIONS=100)
def test_chat_sessions_per_client_count_an_ipv6_64_as_one_client():
    admission = Admission()
    slots = [admission.acquire("2001:db8::1"), admission.acquire("2001:db8::2")]
    with pytest.raises(LimitExceeded, match="too many open sessions"):
        admission.acquire("2001:db8::ffff:3")  # a third address of the same /64
    other = admission.acquire("2001:db8:0:1::1")  # the next /64 is someone else
    assert admission.count("2001:db8::9") == 2
    for slot in [*slots, other]:
        slot.release()
    assert admission.total == 0


def test_reachability_probes_per_client_count_an_ipv6_64_as_one_client():
    async def scenario():
        limiter = ProbeLimiter(ttl=60, per_client=2, window=60, concurrency=8)

        async def probe():
            return "reachable"

        await limiter.run("peer-a", "2001:db8::1", probe)
        await limiter.run("peer-b", "2001:db8::2", probe)
        with pytest.raises(TooManyProbes, match="at most 2 checks"):
            await limiter.run("peer-c", "2001:db8::3", probe)
        assert await limiter.run("peer-c", "2001:db8:0:1::3", probe) == "reachable"

    asyncio.run(scenario())
