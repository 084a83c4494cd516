"""The floor under every server hop: round trips through two p2pd daemons with an echo handler.

    python bench/bench_transport.py [--rounds 500]

Prints `stream_rtt_ms` (a message and its answer on one open stream, as rpc_inference steps
travel) and `unary_rtt_ms` (as rpc_info pings travel), medians over the rounds. Compare them with
the per-hop overhead in bench_generate.py to see how much of a step is transport.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import AsyncIterator  # noqa: UP035  (hivemind reads typing's hints)

from hivemind import DHT
from hivemind.p2p import P2PContext, ServicerBase
from hivemind.proto import runtime_pb2


class Echo(ServicerBase):
    async def rpc_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for _ in requests:
            yield runtime_pb2.ExpertResponse()

    async def rpc_unary(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        return runtime_pb2.ExpertResponse()


async def measure(rounds: int) -> None:
    server = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    client = DHT(
        start=True, initial_peers=server.get_visible_maddrs(), client_mode=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"]
    )
    try:
        await Echo().add_p2p_handlers(await server.replicate_p2p())
        stub = Echo.get_stub(await client.replicate_p2p(), server.peer_id)
        queue: asyncio.Queue = asyncio.Queue()

        async def requests():
            while True:
                yield await queue.get()

        queue.put_nowait(runtime_pb2.ExpertRequest(uid="open"))  # the stream opens on its first message
        responses = await stub.rpc_stream(requests())
        await anext(responses)
        stream = []
        for _ in range(rounds):
            began = time.perf_counter()
            queue.put_nowait(runtime_pb2.ExpertRequest(uid="step"))
            await anext(responses)
            stream.append(time.perf_counter() - began)
        unary = []
        for _ in range(rounds):
            began = time.perf_counter()
            await stub.rpc_unary(runtime_pb2.ExpertRequest(uid="ping"))
            unary.append(time.perf_counter() - began)
        print(f"stream_rtt_ms={statistics.median(stream) * 1000:.3f}")
        print(f"unary_rtt_ms={statistics.median(unary) * 1000:.3f}")
    finally:
        client.shutdown()
        server.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=500)
    asyncio.run(measure(parser.parse_args().rounds))


if __name__ == "__main__":
    main()
