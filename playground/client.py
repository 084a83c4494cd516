"""A small asyncio client for `/api/v2/generate`, for scripts, benchmarks and tests.

    client = await PlaygroundClient.connect("ws://127.0.0.1:8000/api/v2/generate")
    await client.open_session("demo", max_length=512)
    async for message in client.generate(inputs="Hello", stop_sequence="<|eot_id|>"):
        print(message["outputs"], end="")
    await client.close()

Only the standard library: the websocket protocol (RFC 6455) is simple enough for a client,
and autobahn cannot be used in a process where Django has loaded daphne (txaio allows one
framework per process, and daphne picks Twisted).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_TEXT, _BINARY, _CONTINUATION, _CLOSE, _PING, _PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA


class ConnectionRefused(ConnectionError):
    """The server refused the websocket handshake (e.g. a foreign origin)."""


def _frame(opcode: int, payload: bytes) -> bytes:
    """One final frame, masked as RFC 6455 requires of clients."""
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
    mask = os.urandom(4)
    key = (mask * (length // 4 + 1))[:length]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(length, "big")
    return header + mask + masked


class PlaygroundClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader, self._writer = reader, writer
        self._messages: asyncio.Queue[str | bytes | None] = asyncio.Queue()
        self.close_code: int | None = None
        self._closing = False
        self._receiving = asyncio.create_task(self._read_frames())

    @classmethod
    async def connect(cls, url: str, *, origin: str | None = None, timeout: float = 10.0) -> PlaygroundClient:
        """`origin` defaults to the server's own, as a page served by the site would send; `""` sends none,
        as scripts do (the server refuses other sites' origins with an error message and close code 4003)."""
        parts = urlsplit(url)
        secure = parts.scheme == "wss"
        port = parts.port or (443 if secure else 80)
        reader, writer = await asyncio.wait_for(asyncio.open_connection(parts.hostname, port, ssl=secure), timeout)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16))
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        if origin is None:
            origin = f"{'https' if secure else 'http'}://{parts.netloc}"
        origin_header = f"Origin: {origin}\r\n" if origin else ""
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n{origin_header}\r\n".encode()
        )
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        except asyncio.IncompleteReadError:
            writer.close()
            raise ConnectionRefused("the server closed the connection during the handshake") from None
        status, *lines = head.decode("latin-1").split("\r\n")
        headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
        accept = base64.b64encode(hashlib.sha1(key + _GUID).digest()).decode()
        if status.split(" ")[1:2] != ["101"] or headers.get("sec-websocket-accept") != accept:
            writer.close()
            raise ConnectionRefused(f"websocket handshake refused: {status}")
        return cls(reader, writer)

    async def _read_frames(self) -> None:
        parts: list[bytes] = []
        kind = _TEXT
        try:
            while True:
                first, second = await self._reader.readexactly(2)
                opcode, length = first & 0x0F, second & 0x7F
                if length == 126:
                    (length,) = struct.unpack("!H", await self._reader.readexactly(2))
                elif length == 127:
                    (length,) = struct.unpack("!Q", await self._reader.readexactly(8))
                payload = await self._reader.readexactly(length)  # servers do not mask
                if opcode == _CLOSE:
                    self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                    if not self._closing:
                        self._closing = True
                        self._writer.write(_frame(_CLOSE, payload[:2]))
                    return
                if opcode == _PING:
                    self._writer.write(_frame(_PONG, payload))
                    continue
                if opcode in (_TEXT, _BINARY):
                    kind, parts = opcode, [payload]
                elif opcode == _CONTINUATION:
                    parts.append(payload)
                else:
                    continue
                if first & 0x80:  # FIN: the message is complete
                    data = b"".join(parts)
                    self._messages.put_nowait(data.decode("utf-8") if kind == _TEXT else data)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.close_code = self.close_code or 1006
        finally:
            self._messages.put_nowait(None)
            self._writer.close()

    async def send(self, message: dict[str, Any] | str | bytes) -> None:
        if isinstance(message, bytes):
            self._writer.write(_frame(_BINARY, message))
        else:
            text = message if isinstance(message, str) else json.dumps(message)
            self._writer.write(_frame(_TEXT, text.encode("utf-8")))
        await self._writer.drain()

    async def receive(self, timeout: float = 60.0) -> dict[str, Any]:
        """The next message, parsed; raises ConnectionError once the socket has closed."""
        payload = await asyncio.wait_for(self._messages.get(), timeout)
        if payload is None:
            self._messages.put_nowait(None)  # stay closed for later calls
            raise ConnectionError(f"the server closed the connection (code {self.close_code})")
        return json.loads(payload)

    async def open_session(self, model: str, max_length: int, timeout: float = 120.0) -> dict[str, Any]:
        await self.send({"type": "open_inference_session", "model": model, "max_length": max_length})
        return await self.receive(timeout)

    async def generate(self, timeout: float = 60.0, **params: Any) -> AsyncIterator[dict[str, Any]]:
        """Every message of one reply, up to the one with `stop: true` (or an error)."""
        await self.send({"type": "generate", **params})
        while True:
            message = await self.receive(timeout)
            yield message
            if not message.get("ok") or message.get("stop"):
                return

    async def stop(self) -> None:
        await self.send({"type": "stop"})

    async def close(self, timeout: float = 5.0) -> None:
        """Close handshake: the server then frees this socket's session."""
        if not self._closing and not self._receiving.done():
            self._closing = True
            self._writer.write(_frame(_CLOSE, struct.pack("!H", 1000)))
        try:
            await asyncio.wait_for(asyncio.shield(self._receiving), timeout)
        except TimeoutError:
            self._receiving.cancel()
            self._writer.close()
