"""Protobuf messages over raw libp2p streams, byte-compatible with hivemind's protobuf streams.

hivemind frames each message as a marker byte (0: message, 1: error), an 8-byte big-endian
length and the serialized protobuf; an empty error ends the stream. Its generic stream
machinery spends a task, a queue and several event-loop turns on every message and writes each
frame in three pieces. An inference step is one small message each way, so the session path
(`rpc_inference`) uses these instead: the server reads and writes frames on its event loop
directly, and the client talks to its local p2pd daemon over a plain blocking socket from the
thread that generates, without a hop to an event loop thread. Peers that use hivemind's own
stream client see the same bytes.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import TypeVar

from google.protobuf.message import DecodeError, Message
from hivemind.p2p import P2P, PeerID
from hivemind.proto import p2pd_pb2
from hivemind.proto.p2pd_pb2 import RPCError

M = TypeVar("M", bound=Message)

MESSAGE_MARKER = b"\x00"
ERROR_MARKER = b"\x01"
HEADER_BYTES = 8
MAX_CONTROL_MESSAGE_BYTES = 1 << 20  # the daemon's answers to control requests are small


class RemoteError(RuntimeError):
    """The peer answered with an error frame; the message is the peer's text."""


class FrameError(ValueError):
    """The peer sent bytes that are not a valid frame (bad marker, oversized or unparsable message)."""


def frame(message: Message, marker: bytes = MESSAGE_MARKER) -> bytes:
    payload = message.SerializeToString()
    return marker + len(payload).to_bytes(HEADER_BYTES, "big") + payload


def _error_frame(text: str = "") -> bytes:
    """An error frame; hivemind reads an empty one as the end of the stream."""
    return frame(RPCError(message=text), ERROR_MARKER)


def _check_header(head: bytes, max_bytes: int) -> tuple[bytes, int]:
    """The marker and payload length from a frame's first 1 + HEADER_BYTES bytes."""
    marker = head[:1]
    if marker not in (MESSAGE_MARKER, ERROR_MARKER):
        raise FrameError(f"unknown frame marker {marker!r}")
    length = int.from_bytes(head[1:], "big")
    if length > max_bytes:
        raise FrameError(f"a message of {length} bytes is larger than the limit of {max_bytes}")
    return marker, length


def _parse(marker: bytes, payload: bytes, message_type: type[M]) -> M | None:
    try:
        if marker == MESSAGE_MARKER:
            return message_type.FromString(payload)
        error = RPCError.FromString(payload)
    except DecodeError:
        raise FrameError(f"the message is not a valid {message_type.__name__}") from None
    if error.message:
        raise RemoteError(error.message)
    return None


# ----- the server side: asyncio streams -----


async def read_message(
    reader: asyncio.StreamReader, message_type: type[M], max_bytes: int, hold: Callable[[int], None] | None = None
) -> M | None:
    """The next message; None when the peer ended the stream. Raises RemoteError for the peer's
    error frames, FrameError for malformed bytes, asyncio.IncompleteReadError when the stream broke.
    `hold` is told a frame's size before it is read (and may refuse it by raising)."""
    marker, payload = await _read_frame(reader, max_bytes, hold)
    return _parse(marker, payload, message_type)


async def _read_frame(
    reader: asyncio.StreamReader, max_bytes: int, hold: Callable[[int], None] | None = None
) -> tuple[bytes, bytes]:
    marker, length = _check_header(await reader.readexactly(1 + HEADER_BYTES), max_bytes)
    if hold is not None:
        hold(length)
    return marker, await reader.readexactly(length)


async def write_message(writer: asyncio.StreamWriter, message: Message) -> None:
    writer.write(frame(message))
    await writer.drain()


async def write_error(writer: asyncio.StreamWriter, text: str) -> None:
    writer.write(_error_frame(text))
    await writer.drain()


async def close_when_peer_ends(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    max_bytes: int,
    linger: float = 2.0,
    *,
    until_eof: bool = False,
) -> None:
    """Close our end once the peer has ended its side (end-of-stream, an error or EOF), or after `linger` s.

    Closing while the peer still writes resets the stream, and a reset can drop the frames still
    on their way to the peer, such as the error that explains why we stop. So the rest of the
    peer's messages are read and dropped first. With `until_eof` (after writing an error) we wait
    for the peer to close even after its end-of-stream: a peer may end its side before our error
    reaches it, and our close would then race the error frame through its daemon.
    """
    try:
        async with asyncio.timeout(linger):
            while (await _read_frame(reader, max_bytes))[0] == MESSAGE_MARKER or until_eof:
                pass
    except (OSError, TimeoutError, asyncio.IncompleteReadError, FrameError):
        pass
    finally:
        writer.close()


# ----- the client side: a blocking socket to the local daemon -----


class BlockingStream:
    """A libp2p stream to `peer_id`'s handler, opened through the local p2pd daemon.

    Every call blocks the calling thread (with a timeout) and needs no event loop, so a
    generating thread talks to the servers without handing each step to another thread.
    """

    def __init__(self, p2p: P2P, peer_id: PeerID, handle_name: str, timeout: float):
        self._socket = _connect(p2p, timeout)
        self._timeout: float | None = timeout
        self._buffer = bytearray()  # received, not yet consumed: one recv usually holds a whole frame
        try:
            request = p2pd_pb2.Request(
                type=p2pd_pb2.Request.STREAM_OPEN,
                streamOpen=p2pd_pb2.StreamOpenRequest(peer=peer_id.to_bytes(), proto=[handle_name]),
            )
            payload = request.SerializeToString()
            self._socket.sendall(_varint(len(payload)) + payload)
            response = p2pd_pb2.Response.FromString(self._receive_exactly(self._read_varint()))
            if response.type != p2pd_pb2.Response.OK:
                raise ConnectionError(f"cannot open a stream to {peer_id}: {response.error.msg}")
        except BaseException:
            self._socket.close()
            raise

    def send(self, message: Message, timeout: float) -> None:
        self._set_timeout(timeout)
        self._socket.sendall(frame(message))

    def end(self, timeout: float) -> None:
        """Tell the peer that no more messages follow (hivemind's end of stream)."""
        self._set_timeout(timeout)
        self._socket.sendall(_error_frame())

    def receive(self, message_type: type[M], max_bytes: int, timeout: float) -> M | None:
        """Like `read_message`; raises ConnectionError when the stream broke, TimeoutError when the
        peer stayed silent for `timeout` seconds."""
        self._set_timeout(timeout)
        marker, length = _check_header(self._receive_exactly(1 + HEADER_BYTES), max_bytes)
        return _parse(marker, self._receive_exactly(length), message_type)

    def wait_closed(self, timeout: float) -> None:
        """Read and drop whatever comes until the peer closes its end (or `timeout` passes)."""
        self._set_timeout(timeout)
        self._buffer.clear()
        while self._socket.recv(1 << 16):
            pass

    def close(self) -> None:
        self._socket.close()

    def _set_timeout(self, timeout: float) -> None:
        if timeout != self._timeout:  # each change costs a system call
            self._socket.settimeout(timeout)
            self._timeout = timeout

    def _receive_exactly(self, size: int) -> bytes:
        while len(self._buffer) < size:
            chunk = self._socket.recv(max(size - len(self._buffer), 1 << 16))
            if not chunk:
                raise ConnectionError("the stream was closed by the peer")
            self._buffer += chunk
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def _read_varint(self) -> int:
        value = 0
        for shift in range(0, 64, 7):
            byte = self._receive_exactly(1)[0]
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                if value > MAX_CONTROL_MESSAGE_BYTES:
                    raise ConnectionError("the p2p daemon sent an oversized control message")
                return value
        raise ConnectionError("the p2p daemon sent a malformed length")


def _connect(p2p: P2P, timeout: float) -> socket.socket:
    address = p2p.daemon_listen_maddr
    protocols = {protocol.name for protocol in address.protocols()}
    if "unix" in protocols:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(address.value_for_protocol("unix"))
        except BaseException:
            sock.close()
            raise
        return sock
    host = address.value_for_protocol("ip4" if "ip4" in protocols else "ip6")
    sock = socket.create_connection((host, int(address.value_for_protocol("tcp"))), timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)
