"""The floor under a token over slow links: bare hivemind echo peers making a token's link crossings.

    python bench/wan_floor.py --port PORT [--announce-port PROXY_PORT] [--initial-peers MADDR ...]

runs one echo peer (bench_wan.py starts one behind each block server's link proxy). It answers, on a
raw libp2p stream (`swarm.streams` frames, as `rpc_inference` is served), each message with its own
tensors; a message marked "push" is also sent on to the next peer with a hivemind unary call (as a
server pushes a step), and that peer writes it on the stream its client registered. `Floor` is the
client side: one "token" is the sequence of crossings a generation step makes with two servers,
client -> A -> client -> B -> client when the client relays and client -> A -> B -> client when A
pushes, with no model, no session state and no routing: what the machine and the links cost alone.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from pathlib import Path
from typing import Literal

import torch
from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.proto import runtime_pb2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from swarm.client.event_loop import run_sync  # noqa: E402
from swarm.streams import BlockingStream, read_message, write_message  # noqa: E402
from swarm.wire import serialize  # noqa: E402

READY_MARK = "wan echo ready, peer id"
ECHO_HANDLE = "WanEcho.stream"
MAX_BYTES = 1 << 24
TIMEOUT = 30.0
# Message kinds (the request's uid). ECHO: answer it. PUSH: answer it and send it on to the peer and
# session its metadata names. REGISTER: pushes for the session in its metadata go to this stream.
# COPY: the client's own copy of a pushed step (a server drops it): no answer.
ECHO, PUSH, REGISTER, COPY = "echo", "push", "register", "copy"


class WanEcho(ServicerBase):
    """One echo peer: its raw stream handler and the unary handler that takes pushes."""

    def __init__(self, p2p: P2P):
        self.p2p = p2p
        self.writers: dict[str, asyncio.StreamWriter] = {}  # registered streams by session
        self.pushes: set[asyncio.Task] = set()

    async def serve_stream(self, _info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while (request := await read_message(reader, runtime_pb2.ExpertRequest, MAX_BYTES)) is not None:
                if request.uid == REGISTER:
                    self.writers[request.metadata.decode()] = writer
                    await write_message(writer, runtime_pb2.ExpertResponse())
                elif request.uid in (ECHO, PUSH):
                    if request.uid == PUSH:  # like a server: the push task starts before the answer is written
                        push = asyncio.create_task(self._push(request))
                        self.pushes.add(push)
                        push.add_done_callback(self.pushes.discard)
                    await write_message(writer, runtime_pb2.ExpertResponse(tensors=request.tensors))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _push(self, request: runtime_pb2.ExpertRequest) -> None:
        peer_id, session = request.metadata.decode().split()
        pushed = runtime_pb2.ExpertRequest(uid=session, tensors=request.tensors)
        await self.get_stub(self.p2p, PeerID.from_base58(peer_id)).rpc_push(pushed, timeout=TIMEOUT)

    async def rpc_push(self, request: runtime_pb2.ExpertRequest, _context: P2PContext) -> runtime_pb2.ExpertResponse:
        await write_message(self.writers[request.uid], runtime_pb2.ExpertResponse(tensors=request.tensors))
        return runtime_pb2.ExpertResponse()


async def serve(port: int, announce_port: int | None, initial_peers: list[str]) -> None:
    announce = [f"/ip4/127.0.0.1/tcp/{announce_port}"] if announce_port else None
    p2p = await P2P.create(
        initial_peers=initial_peers, host_maddrs=[f"/ip4/127.0.0.1/tcp/{port}"], announce_maddrs=announce
    )
    echo = WanEcho(p2p)
    await echo.add_p2p_handlers(p2p)
    await p2p.add_binary_stream_handler(ECHO_HANDLE, echo.serve_stream)
    print(f"{READY_MARK} {p2p.peer_id}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await p2p.shutdown()


class Floor:
    """The client of two echo peers A and B (their proxies' addresses): times tokens as `mode` crosses the links."""

    def __init__(self, first: str, second: str, hidden_size: int):
        self.p2p: P2P = run_sync(P2P.create(initial_peers=[first, second]), timeout=60)
        self.peers = [PeerID.from_base58(address.rsplit("/p2p/", 1)[1]) for address in (first, second)]
        self.streams: list[BlockingStream] = []
        try:
            self.streams = [BlockingStream(self.p2p, peer, ECHO_HANDLE, TIMEOUT) for peer in self.peers]
        except BaseException:
            self.close()
            raise
        hidden = [serialize(torch.zeros(1, 1, hidden_size))]
        session = "floor"
        self.requests = {
            ECHO: runtime_pb2.ExpertRequest(uid=ECHO, tensors=hidden),
            PUSH: runtime_pb2.ExpertRequest(
                uid=PUSH, tensors=hidden, metadata=f"{self.peers[1].to_base58()} {session}".encode()
            ),
            COPY: runtime_pb2.ExpertRequest(uid=COPY, tensors=hidden),
        }
        self._round_trip(1, runtime_pb2.ExpertRequest(uid=REGISTER, metadata=session.encode()))

    def _round_trip(self, index: int, request: runtime_pb2.ExpertRequest) -> None:
        self.streams[index].send(request, TIMEOUT)
        self._receive(index)

    def _receive(self, index: int) -> None:
        if self.streams[index].receive(runtime_pb2.ExpertResponse, MAX_BYTES, TIMEOUT) is None:
            raise ConnectionError("an echo peer ended its stream")

    def token(self, mode: Literal["relay", "push"]) -> None:
        """One token's crossings, in the order the client's inference session makes them."""
        if mode == "relay":
            self._round_trip(0, self.requests[ECHO])
            self._round_trip(1, self.requests[ECHO])
        else:  # A answers and pushes to B; the client sends B its copy, then reads B's answer to the push
            self._round_trip(0, self.requests[PUSH])
            self.streams[1].send(self.requests[COPY], TIMEOUT)
            self._receive(1)

    def ms_per_token(self, mode: Literal["relay", "push"], tokens: int) -> float:
        began = time.perf_counter()
        for _ in range(tokens):
            self.token(mode)
        return (time.perf_counter() - began) * 1000 / tokens

    def close(self) -> None:
        for stream in self.streams:
            stream.close()
        run_sync(self.p2p.shutdown(), timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="the port to listen on (behind a link proxy)")
    parser.add_argument("--announce-port", type=int, help="the link proxy's port, announced instead")
    parser.add_argument("--initial-peers", nargs="*", default=[], help="peers to connect to (the next echo peer)")
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.announce_port, args.initial_peers))


if __name__ == "__main__":
    main()
