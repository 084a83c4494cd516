"""The floor under every server hop: round trips through two p2pd daemons to an echo handler.

    python bench/bench_transport.py [--rounds 500] [--hidden-size 256]

Prints medians over the rounds of:
- `stream_rtt_ms`: the engine's own path for inference steps: a `BlockingStream` from this
  thread, framed messages carrying one token's hidden states, answered by a raw stream handler;
- `hivemind_stream_rtt_ms`: the same messages through hivemind's generic protobuf streams
  (request queue, async generators, stubs), called from this thread through the client's event
  loop as a synchronous `generate()` would: the path this engine used before `BlockingStream`;
- `unary_rtt_ms`: one unary call, as rpc_info pings travel.
Compare them with `hop_overhead_ms` of bench_hop.py to see how much of a hop is transport.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import AsyncIterator  # noqa: UP035  (hivemind reads typing's hints)

import torch
from hivemind.p2p import P2P, P2PContext, ServicerBase
from hivemind.proto import runtime_pb2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from swarm.client.event_loop import run_sync  # noqa: E402
from swarm.streams import BlockingStream, read_message, write_message  # noqa: E402
from swarm.wire import serialize  # noqa: E402

RAW_HANDLE = "Bench.raw_echo"
MAX_BYTES = 1 << 24


class Echo(ServicerBase):
    """hivemind's generic handlers: each answer carries the request's tensors back."""

    async def rpc_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for request in requests:
            yield runtime_pb2.ExpertResponse(tensors=request.tensors)

    async def rpc_unary(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        return runtime_pb2.ExpertResponse(tensors=request.tensors)


async def raw_echo(stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The engine's handler shape: read a frame, answer with one write, until end-of-stream."""
    try:
        while (request := await read_message(reader, runtime_pb2.ExpertRequest, MAX_BYTES)) is not None:
            await write_message(writer, runtime_pb2.ExpertResponse(tensors=request.tensors))
    finally:
        writer.close()


def median_ms(rounds: int, round_trip: Callable[[], object]) -> float:
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        round_trip()
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1000


async def start_pair() -> tuple[P2P, P2P]:
    server = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    client = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=await server.get_visible_maddrs())
    await server.add_binary_stream_handler(RAW_HANDLE, raw_echo)
    await Echo().add_p2p_handlers(server)
    return server, client


class HivemindStream:
    """One open hivemind protobuf stream, one message and its answer at a time."""

    def __init__(self, stub) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.stub = stub
        self.responses = None

    async def _requests(self):
        while (request := await self.queue.get()) is not None:
            yield request

    async def round_trip(self, request: runtime_pb2.ExpertRequest) -> runtime_pb2.ExpertResponse:
        self.queue.put_nowait(request)
        if self.responses is None:  # the stream opens with its first message
            self.responses = await self.stub.rpc_stream(self._requests())
        return await anext(self.responses)

    async def close(self) -> None:
        self.queue.put_nowait(None)
        if self.responses is not None:
            async for _ in self.responses:
                pass


async def stop_pair(server: P2P, client: P2P) -> None:
    await client.shutdown()
    await server.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=500)
    parser.add_argument("--hidden-size", type=int, default=256, help="one token's hidden states per message")
    args = parser.parse_args()
    request = runtime_pb2.ExpertRequest(uid="step", tensors=[serialize(torch.randn(1, 1, args.hidden_size))])

    server, client = run_sync(start_pair(), timeout=60)
    try:
        stream = BlockingStream(client, server.peer_id, RAW_HANDLE, timeout=10)
        try:

            def raw_round_trip() -> None:
                stream.send(request, 10)
                stream.receive(runtime_pb2.ExpertResponse, MAX_BYTES, 10)

            raw_round_trip()  # warm-up
            raw = median_ms(args.rounds, raw_round_trip)
            stream.end(10)
            stream.wait_closed(10)
        finally:
            stream.close()

        stub = Echo.get_stub(client, server.peer_id)
        generic = HivemindStream(stub)
        run_sync(generic.round_trip(request), timeout=10)  # opens the stream
        hivemind_stream = median_ms(args.rounds, lambda: run_sync(generic.round_trip(request), timeout=10))
        run_sync(generic.close(), timeout=10)
        unary = median_ms(args.rounds, lambda: run_sync(stub.rpc_unary(request), timeout=10))
    finally:
        run_sync(stop_pair(server, client), timeout=30)
    print(f"stream_rtt_ms={raw:.3f}")
    print(f"hivemind_stream_rtt_ms={hivemind_stream:.3f}")
    print(f"unary_rtt_ms={unary:.3f}")


if __name__ == "__main__":
    main()
