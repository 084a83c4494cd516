"""Request bodies are capped at `settings.MAX_REQUEST_BODY_BYTES` before anything reads them whole.

daphne reads a request's whole body (into memory, or a temporary file past 100 kB) before the
application sees its first byte, so no ASGI middleware can stop a 10 GB upload there. Its request
class is therefore replaced (`install_daphne_cap`): a body is refused as soon as its Content-Length,
or what has arrived of a chunked one, passes the limit: a 413 answer, then the connection closes.
What the client still sends is read and dropped (not kept) for up to another limit's worth and
DRAIN_SECONDS, so that a client which sends first and reads afterwards gets the answer rather than a
reset connection.

`BodyLimit` is the same cap as ASGI middleware, for servers that stream bodies to the application
(and for anything that calls the application directly). Django's `DATA_UPLOAD_MAX_MEMORY_SIZE` is
set to the same number (config/settings.py); the APIs answer its `RequestDataTooBig` with a 413 too.
"""

from __future__ import annotations

import io
import json
import logging
from typing import Any

from daphne import http_protocol
from daphne.http_protocol import WebRequest
from twisted.web import http

logger = logging.getLogger(__name__)

OPENAI_PREFIX = "/v1/"
DRAIN_SECONDS = 10.0  # after a refusal, how long the client may go on sending before the connection closes


def body_limit() -> int:
    from django.conf import settings

    return int(settings.MAX_REQUEST_BODY_BYTES)


def too_large(path: str, limit: int) -> tuple[bytes, bytes]:
    """(content type, body) of the 413 answer, in the error shape of the API at `path`."""
    message = f"the request body is larger than this site accepts ({limit} bytes)"
    if path.startswith(OPENAI_PREFIX):
        error = {"message": message, "type": "invalid_request_error", "param": None, "code": "request_too_large"}
        body: dict[str, Any] = {"error": error}
    else:  # chat.petals.dev's shape, which this site's other APIs use
        body = {"ok": False, "traceback": message}
    return b"application/json", json.dumps(body).encode()


def _declared_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server refuses a malformed length itself
    return None


class BodyLimit:
    """ASGI middleware: HTTP bodies above the limit get a 413 before the application reads them.

    The body (at most the limit) is collected here and handed to the application in one message;
    later `receive` calls (Django listens for the client going away) reach the server's own.
    """

    def __init__(self, app: Any, limit: int | None = None):
        self.app, self._limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> Any:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self._limit if self._limit is not None else body_limit()
        declared = _declared_length(scope.get("headers", []))
        if declared is not None and declared > limit:
            return await self._refuse(scope, send, limit)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message], receive), send)  # the client left
            size += len(message.get("body", b""))
            if size > limit:
                return await self._refuse(scope, send, limit)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        whole = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        return await self.app(scope, _replay([whole], receive), send)

    @staticmethod
    async def _refuse(scope: dict, send: Any, limit: int) -> None:
        content_type, body = too_large(scope.get("path", ""), limit)
        headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
        headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _replay(messages: list[dict], receive: Any) -> Any:
    pending = list(messages)

    async def replayed() -> dict:
        return pending.pop(0) if pending else await receive()

    return replayed


# ----- daphne -----


class CappedRequest(WebRequest):
    """daphne's request, refusing a body above the limit while it arrives: Twisted calls `gotLength`
    once the headers are in, then `handleContentChunk` for each piece of the body, and
    `requestReceived` (which starts the application) only once the body is complete."""

    limit = 0
    received = 0
    refused = False
    dropped = 0
    closing = False
    deadline: Any = None  # the delayed call that ends a refused request's connection

    def gotLength(self, length: int | None) -> None:
        self.limit = body_limit()
        if length is not None and length > self.limit and self._can_refuse():
            self._refuse(f"a {length}-byte")
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.refused:
            self._drop(data)
            return
        self.received += len(data)
        if self.received > self.limit and self._can_refuse():
            self._refuse("a chunked")
            self._drop(data)
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self.refused:  # the whole (dropped) body came: the answer is out, the application never runs
            self._close()
            return
        super().requestReceived(command, path, version)

    def connectionLost(self, reason: Any) -> None:
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()
        super().connectionLost(reason)

    def _can_refuse(self) -> bool:
        return isinstance(self.channel, http.HTTPChannel)  # HTTP/2 streams (TLS only) keep Twisted's way

    def _refuse(self, size: str) -> None:
        self.refused = True
        if self.content is not None:
            self.content.close()  # what was kept of the body goes
        self.content = io.BytesIO()  # Twisted's code expects a file
        self.requestHeaders.removeHeader(b"expect")  # no "100 Continue" after the answer
        channel = self.channel
        channel.persistent = False
        path = channel._path.split(b"?", 1)[0].decode("latin-1")
        content_type, body = too_large(path, self.limit)
        head = (
            b"HTTP/1.1 413 Content Too Large\r\nContent-Type: " + content_type
            + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n"
        )  # fmt: skip
        channel.transport.write(head + body)
        peer = getattr(channel.transport.getPeer(), "host", "?")
        logger.warning("Refused %s request body from %s to %s (limit %d bytes)", size, peer, path, self.limit)
        self.deadline = channel.callLater(DRAIN_SECONDS, self._close)

    def _drop(self, data: bytes) -> None:
        self.dropped += len(data)
        if self.dropped > self.limit:  # patience ends: stop reading (the client may see a reset)
            self._close()

    def _close(self) -> None:
        if not self.closing:
            self.closing = True
            self.channel.loseConnection()


def install_daphne_cap() -> None:
    """daphne's HTTP/1.1 connections make `CappedRequest`s from now on (idempotent)."""
    factory = http_protocol.HTTPFactory
    if getattr(factory.buildProtocol, "capped", False):
        return
    original = factory.buildProtocol

    def build_protocol(self: Any, addr: Any) -> Any:
        protocol = original(self, addr)
        if protocol is not None and protocol.requestFactory is WebRequest:
            protocol.requestFactory = CappedRequest
        return protocol

    build_protocol.capped = True  # type: ignore[attr-defined]
    factory.buildProtocol = build_protocol
