"""swarm.streams: the same bytes as hivemind's protobuf streams, strict parsing, and the blocking client."""

from __future__ import annotations

import asyncio
import threading

import pytest
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2
from hivemind.proto.p2pd_pb2 import RPCError

from swarm.client.event_loop import cancel_other_tasks
from swarm.streams import (
    BlockingStream,
    FrameError,
    RemoteError,
    close_when_peer_ends,
    frame,
    read_message,
    write_error,
    write_message,
)

REQUEST = runtime_pb2.ExpertRequest(uid="model.0 model.1", metadata=b"\x80")


class CollectingWriter:
    def __init__(self):
        self.data, self.closed = b"", False

    def write(self, data: bytes) -> None:
        self.data += bytes(data)

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def written_by(send, *args) -> bytes:
    """What `send(*args, writer)` writes (hivemind's argument order); a lambda may take the writer alone."""
    writer = CollectingWriter()
    asyncio.run(send(*args, writer))
    return writer.data


def reader_of(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


def read(data: bytes, max_bytes: int = 1 << 20):
    async def go():
        return await read_message(reader_of(data), runtime_pb2.ExpertRequest, max_bytes)

    return asyncio.run(go())


def test_frames_are_the_bytes_hivemind_writes():
    assert frame(REQUEST) == written_by(P2P.send_protobuf, REQUEST)
    assert written_by(lambda writer: write_message(writer, REQUEST)) == frame(REQUEST)
    hivemind_error = written_by(P2P.send_protobuf, RPCError(message="no such block"))
    assert written_by(lambda writer: write_error(writer, "no such block")) == hivemind_error


def test_reads_what_hivemind_writes():
    assert read(written_by(P2P.send_protobuf, REQUEST)) == REQUEST
    assert read(written_by(P2P.send_protobuf, P2P.END_OF_STREAM)) is None
    with pytest.raises(RemoteError, match="no such block"):
        read(written_by(P2P.send_protobuf, RPCError(message="no such block")))


def test_hivemind_reads_what_we_write():
    async def go():
        message, error = await P2P.receive_protobuf(runtime_pb2.ExpertRequest, reader_of(frame(REQUEST)))
        assert message == REQUEST and error is None

    asyncio.run(go())


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x07" + bytes(8), "unknown frame marker"),
        (b"\x00" + (10**12).to_bytes(8, "big"), "larger than the limit"),
        (b"\x00" + (3).to_bytes(8, "big") + b"\xff\xff\xff", "not a valid ExpertRequest"),
        (b"\x01" + (2).to_bytes(8, "big") + b"\xff\xff", "not a valid ExpertRequest"),
    ],
)
def test_malformed_frames_raise_frame_error(data, message):
    with pytest.raises(FrameError, match=message):
        read(data)


def test_a_truncated_frame_is_a_broken_stream():
    with pytest.raises(asyncio.IncompleteReadError):
        read(frame(REQUEST)[:-3])


def test_close_waits_for_the_peers_end_of_stream():
    end_of_stream = written_by(P2P.send_protobuf, P2P.END_OF_STREAM)

    async def go():
        writer = CollectingWriter()
        reader = reader_of(frame(REQUEST) * 3 + end_of_stream, eof=False)
        await close_when_peer_ends(reader, writer, max_bytes=1 << 20, linger=5)
        assert writer.closed and reader._buffer == b""  # everything up to the end-of-stream was read

        silent = CollectingWriter()
        await close_when_peer_ends(reader_of(b"", eof=False), silent, max_bytes=1 << 20, linger=0.05)
        assert silent.closed  # a peer that never ends its side is not waited for forever

    asyncio.run(go())


def test_after_an_error_close_waits_for_the_peer_to_close_not_just_its_end_of_stream():
    """The peer may have ended its side before our error frame reached it: closing then could reset the
    stream under the error. So after an error we wait for its EOF (it closes once it read the error)."""
    end_of_stream = written_by(P2P.send_protobuf, P2P.END_OF_STREAM)

    async def go():
        writer = CollectingWriter()
        reader = reader_of(frame(REQUEST) + end_of_stream, eof=False)
        closing = asyncio.create_task(
            close_when_peer_ends(reader, writer, max_bytes=1 << 20, linger=60, until_eof=True)
        )
        for _ in range(10):
            await asyncio.sleep(0)
        assert reader._buffer == b"" and not closing.done() and not writer.closed  # end-of-stream read, no EOF yet
        reader.feed_eof()  # the peer has read our error and closes
        await asyncio.wait_for(closing, 5)
        assert writer.closed

    asyncio.run(go())


# ----- BlockingStream against real p2pd daemons -----


class Echo:
    """A raw-stream handler that answers each request with its uid reversed, then ends on end-of-stream."""

    async def __call__(self, stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while (request := await read_message(reader, runtime_pb2.ExpertRequest, 1 << 20)) is not None:
                if request.uid == "fail":
                    await write_error(writer, "asked to fail")
                    continue
                if request.uid != "silence":
                    await write_message(writer, runtime_pb2.ExpertResponse(metadata=request.uid[::-1].encode()))
        finally:
            writer.close()


@pytest.fixture(scope="module")
def p2p_pair():
    loop = asyncio.new_event_loop()

    async def start() -> tuple[P2P, P2P]:
        server = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        client = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=await server.get_visible_maddrs())
        await server.add_binary_stream_handler("Test.echo", Echo())
        return server, client

    server, client = loop.run_until_complete(start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield server, client
    finally:

        async def stop() -> None:
            await client.shutdown()
            await server.shutdown()
            await cancel_other_tasks()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.mark.integration
def test_blocking_stream_round_trips(p2p_pair):
    server, client = p2p_pair
    stream = BlockingStream(client, server.peer_id, "Test.echo", timeout=10)
    try:
        for uid in ("abc", "model.0 model.1", "x" * 100_000):
            stream.send(runtime_pb2.ExpertRequest(uid=uid), timeout=10)
            response = stream.receive(runtime_pb2.ExpertResponse, 1 << 20, timeout=10)
            assert response.metadata == uid[::-1].encode()
        stream.send(runtime_pb2.ExpertRequest(uid="fail"), timeout=10)
        with pytest.raises(RemoteError, match="asked to fail"):
            stream.receive(runtime_pb2.ExpertResponse, 1 << 20, timeout=10)
        stream.send(runtime_pb2.ExpertRequest(uid="silence"), timeout=10)
        with pytest.raises(TimeoutError):
            stream.receive(runtime_pb2.ExpertResponse, 1 << 20, timeout=0.2)
        stream.end(timeout=10)
        stream.wait_closed(timeout=10)  # the handler closes once it reads the end-of-stream
    finally:
        stream.close()


@pytest.mark.integration
def test_blocking_stream_to_an_unknown_handler_fails_clearly(p2p_pair):
    server, client = p2p_pair
    with pytest.raises(ConnectionError, match="cannot open a stream"):
        BlockingStream(client, server.peer_id, "Test.nothing_here", timeout=10)
