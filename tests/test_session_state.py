"""A session's state has one owner: a step is applied exactly once or not at all, whatever copy comes first,
is cancelled or fails.

In-process: a real backend (two blocks of the demo model) behind a handler, its compute held at a gate
so that a request can be cancelled exactly while its step computes.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2
from transformers import AutoConfig

from swarm.checkpoint import CheckpointFiles
from swarm.models.registry import family_for, prepare_config
from swarm.names import block_uids, join_chain
from swarm.server.backend import load_span
from swarm.server.batching import StepBatcher
from swarm.server.handler import INFERENCE_HANDLE, TransformerConnectionHandler, _Session
from swarm.server.memory_cache import KVCachePool
from swarm.server.server import BlockServer
from swarm.streams import RemoteError, frame, read_message
from swarm.wire import BadRequest, deserialize, dumps_metadata, loads_metadata, pack_args, serialize
from tests.conftest import DEMO_MODEL

PREFIX = "demo_model-hf"
PREVIOUS = "12D3KooWNS8BUH27E7cxS43fK1Ash9ZbpZzHsGvy71oXp7NyQBDU"  # the server before this one in a chain
STRANGER = "QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN"


def load_blocks():
    config = prepare_config(AutoConfig.from_pretrained(DEMO_MODEL))
    return load_span(CheckpointFiles(DEMO_MODEL), family_for(config), config, 0, 2, torch.float32, torch.device("cpu"))


@pytest.fixture(scope="module")
def backend():
    return load_blocks()


def step_request(hidden: torch.Tensor, **metadata) -> runtime_pb2.ExpertRequest:
    tensors, structure = pack_args([hidden, torch.empty(0), torch.empty(0, dtype=torch.int64)])
    return runtime_pb2.ExpertRequest(
        uid=join_chain(block_uids(PREFIX, 0, 2)),
        tensors=[serialize(t) for t in tensors],
        metadata=dumps_metadata({"args_structure": structure, **metadata}),
    )


async def apply(handler, session, request: runtime_pb2.ExpertRequest, **kwargs):
    return await handler._inference_step(session, request, loads_metadata(request.metadata), **kwargs)


class ClientStream:
    """What the handler writes to a session's client, readable as frames."""

    def __init__(self) -> None:
        self.reader = asyncio.StreamReader()

    def write(self, data: bytes) -> None:
        self.reader.feed_data(data)

    async def drain(self) -> None:
        pass

    async def outputs(self) -> list[torch.Tensor]:
        self.reader.feed_eof()
        frames = []
        while not self.reader.at_eof():
            message = await read_message(self.reader, runtime_pb2.ExpertResponse, 1 << 24)
            frames.append(deserialize(message.tensors)[0])
        return frames


@pytest.fixture
def handler(backend):
    handler = TransformerConnectionHandler(backend, PREFIX, KVCachePool(2**26), max_length=64)
    yield handler
    handler.executor.shutdown(wait=True)


@pytest.fixture
def gate(backend, monkeypatch) -> SimpleNamespace:
    """Holds the backend's compute until `gate.opened` is set; `gate.entered` says a step is computing."""
    gate = SimpleNamespace(entered=threading.Event(), opened=threading.Event())
    compute = backend.inference_steps

    def gated(*args, **kwargs):
        gate.entered.set()
        assert gate.opened.wait(30)
        return compute(*args, **kwargs)

    monkeypatch.setattr(backend, "inference_steps", gated)
    return gate


def test_a_push_cancelled_mid_step_is_applied_once_and_answers_the_client(backend, handler, gate):
    """The sender of a push times out while the step computes: the step still counts once, its outputs still
    reach the client, and the client's own copy of the step is dropped instead of computed again at P+n."""
    prompt, following = torch.randn(1, 5, backend.hidden_size), torch.randn(1, 1, backend.hidden_size)
    reference_cache = backend.new_cache(0, 2, 1, 64)
    expected = [backend.inference_step(prompt, reference_cache), backend.inference_step(following, reference_cache)]

    async def run():
        client = ClientStream()
        session = _Session(backend.new_cache(0, 2, 1, 64), 0, 2, 64, 1, client, previous_server=PREVIOUS)
        handler._sessions["s"] = session
        pushed = step_request(prompt, session_id="s", step_id="one", pushed=True)
        push = asyncio.create_task(handler.rpc_push(pushed, SimpleNamespace(remote_id=PREVIOUS)))
        await asyncio.get_running_loop().run_in_executor(None, gate.entered.wait, 30)
        push.cancel()  # the sender's timeout, while the step computes
        await asyncio.gather(push, return_exceptions=True)
        gate.opened.set()
        own_copy = await apply(handler, session, step_request(prompt, step_id="one"))
        assert own_copy is None  # applied already: not computed a second time
        assert session.cache.position == 5
        answer = await apply(handler, session, step_request(following, step_id="two"))
        await session.close()
        await handler.batcher.close()
        return await client.outputs(), deserialize(answer.tensors)[0], session

    pushed_outputs, second, session = asyncio.run(run())
    assert len(pushed_outputs) == 1  # the pushed step's outputs reached the client once
    torch.testing.assert_close(pushed_outputs[0], expected[0])
    torch.testing.assert_close(second, expected[1])  # the next token sees the prompt cached once
    assert session.cache.position == 6 and session.closed


def test_a_session_ends_only_after_the_step_applied_to_it(backend, handler, gate):
    """A session whose stream ends while a pushed step computes on it waits for that step before its cache goes."""

    async def run():
        session = _Session(backend.new_cache(0, 2, 1, 64), 0, 2, 64, 1, ClientStream())
        hidden = torch.randn(1, 3, backend.hidden_size)
        applying = asyncio.create_task(apply(handler, session, step_request(hidden), pushed=True))
        await asyncio.get_running_loop().run_in_executor(None, gate.entered.wait, 30)
        closing = asyncio.create_task(session.close())
        await asyncio.sleep(0.2)
        assert not closing.done()  # still computing on the session's cache
        gate.opened.set()
        await asyncio.wait_for(closing, 30)
        assert applying.done() and session.cache.position == 3
        late = await apply(handler, session, step_request(hidden))
        assert late is None and session.cache.position == 3  # a closed session changes no more
        await handler.batcher.close()

    asyncio.run(run())


def test_a_beam_reorder_is_applied_once_when_a_stacked_batch_is_computed_again(backend, monkeypatch):
    """A stacked forward that fails after the sessions' caches were reordered is computed again step by step:
    the reorders must not be applied a second time (a swap applied twice is no swap)."""
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randn(2, 3, backend.hidden_size, generator=generator) for _ in range(2)]
    steps = [torch.randn(2, 1, backend.hidden_size, generator=generator) for _ in range(2)]
    swap = torch.tensor([1, 0])
    expected = []
    for prompt, hidden in zip(prompts, steps):
        cache = backend.new_cache(0, 2, 2, 16)
        backend.inference_step(prompt, cache)
        expected.append(backend.inference_step(hidden, cache, hypo_ids=swap))

    caches = [backend.new_cache(0, 2, 2, 16) for _ in prompts]
    for prompt, cache in zip(prompts, caches):
        backend.inference_step(prompt, cache)
    run = backend._run

    def stacked_forward_fails(*args, **kwargs):
        if kwargs.get("row_offsets", args[7] if len(args) > 7 else None) is not None:
            raise RuntimeError("out of memory (simulated) in a stacked forward")
        return run(*args, **kwargs)

    monkeypatch.setattr(backend, "_run", stacked_forward_fails)

    async def both_steps():
        with ThreadPoolExecutor(1) as executor:
            batcher = StepBatcher(backend, executor)
            try:
                return await asyncio.gather(*(batcher.step(h, c, hypo_ids=swap) for h, c in zip(steps, caches)))
            finally:
                await batcher.close()

    outputs = asyncio.run(both_steps())
    for output, wanted, cache in zip(outputs, expected, caches):
        torch.testing.assert_close(output, wanted)
        assert cache.position == 4


def test_a_step_that_fails_while_it_computes_ends_the_sessions_use(backend, handler, monkeypatch):
    """A step that fails mid-computation may have reordered or written the cache: the client's copy of it (or any
    later step) is refused with a clear error instead of being applied to a cache in an unknown state."""
    compute = backend.inference_steps

    def reorder_then_fail(steps, adapter=None):
        for step in steps:
            step.cache.reorder(step.hypo_ids)
        raise RuntimeError("device lost (simulated)")

    async def run():
        session = _Session(backend.new_cache(0, 2, 2, 64), 0, 2, 64, 2, ClientStream())
        await apply(handler, session, step_request(torch.randn(2, 3, backend.hidden_size)))
        monkeypatch.setattr(backend, "inference_steps", reorder_then_fail)
        beam_step = step_request_with_hypo_ids(torch.randn(2, 1, backend.hidden_size), torch.tensor([1, 0]), "b")
        with pytest.raises(RuntimeError, match="device lost"):
            await apply(handler, session, beam_step, pushed=True)
        monkeypatch.setattr(backend, "inference_steps", compute)
        with pytest.raises(BadRequest, match="cannot be trusted: open a new session"):
            await apply(handler, session, beam_step)  # the client's own copy
        await session.close()
        await handler.batcher.close()

    asyncio.run(run())


def step_request_with_hypo_ids(hidden: torch.Tensor, hypo_ids: torch.Tensor, step_id: str) -> runtime_pb2.ExpertRequest:
    tensors, structure = pack_args([hidden, torch.empty(0), hypo_ids])
    return runtime_pb2.ExpertRequest(
        uid=join_chain(block_uids(PREFIX, 0, 2)),
        tensors=[serialize(t) for t in tensors],
        metadata=dumps_metadata({"args_structure": structure, "step_id": step_id}),
    )


@pytest.mark.parametrize(
    "next_servers, error",
    [
        ([["12D3KooWNS8BUH27E7cxS43fK1Ash9ZbpZzHsGvy71oXp7NyQBDU", "s2", 2, 10**6]], "within 4096 blocks"),
        ([["12D3KooWNS8BUH27E7cxS43fK1Ash9ZbpZzHsGvy71oXp7NyQBDU", "s2", 0, 4]], "start where the previous one ends"),
        ([["12D3KooWNS8BUH27E7cxS43fK1Ash9ZbpZzHsGvy71oXp7NyQBDU", "s2", 2, 4]] * 65, "at most 64 servers"),
        ([["not a peer id", "s2", 2, 4]], "not a valid base58 peer id"),
        ([["12D3KooWNS8BUH27E7cxS43fK1Ash9ZbpZzHsGvy71oXp7NyQBDU", "s" * 129, 2, 4]], "1 to 128 characters"),
        ([["12D3KooWNS8BUH27E7cxS43fK1Ash9ZbpZzHsGvy71oXp7NyQBDU", "s2", 2, True]], "start where"),
        ("peer", "must be a list"),
    ],
)
def test_next_servers_are_checked_before_the_step(backend, handler, next_servers, error):
    """Strangers' next_servers are validated first: nothing is computed or built from a bad one."""

    async def run():
        session = _Session(backend.new_cache(0, 2, 1, 64), 0, 2, 64, 1, ClientStream())
        request = step_request(torch.randn(1, 2, backend.hidden_size), step_id="x", next_servers=next_servers)
        with pytest.raises(BadRequest, match=error):
            await apply(handler, session, request)
        assert session.cache.position == 0 and not handler._pushes
        await session.close()
        await handler.batcher.close()

    asyncio.run(run())


def test_step_ids_are_short(backend, handler):

    async def run():
        session = _Session(backend.new_cache(0, 2, 1, 64), 0, 2, 64, 1, ClientStream())
        with pytest.raises(BadRequest, match="step_id must be at most 128 characters"):
            await apply(handler, session, step_request(torch.randn(1, 1, backend.hidden_size), step_id="x" * 1000))
        assert not session.seen_steps
        await session.close()
        await handler.batcher.close()

    asyncio.run(run())


def test_pushes_are_taken_only_from_the_previous_server_the_client_named(backend, handler):
    """Anyone who learned a session's id (an earlier server of the chain, one the client replaced) could push
    steps into it, rewinds included: only the server the session's own client names may push, and a push
    cannot change who that is."""
    hidden = torch.randn(1, 3, backend.hidden_size)

    async def push(session_id: str, sender: str, **metadata) -> runtime_pb2.ExpertResponse:
        request = step_request(hidden, session_id=session_id, pushed=True, **metadata)
        return await handler.rpc_push(request, SimpleNamespace(remote_id=sender))

    async def run():
        client = ClientStream()
        session = _Session(backend.new_cache(0, 2, 1, 64), 0, 2, 64, 1, client)
        handler._sessions["s"] = session
        await push("s", PREVIOUS, step_id="unannounced")  # the client named no one yet (as Petals' clients)
        await apply(handler, session, step_request(hidden, step_id="one", previous_server=PREVIOUS))
        await push("s", STRANGER, step_id="injected")
        await push("s", STRANGER, step_id="rewound", start_from_position=0)
        assert session.cache.position == 3 and list(session.seen_steps) == ["one"]
        await push("s", PREVIOUS, step_id="two", previous_server=STRANGER)  # the one allowed; cannot hand over
        assert session.cache.position == 6 and session.previous_server == PREVIOUS
        await push("s", STRANGER, step_id="three")
        with pytest.raises(BadRequest, match="previous_server: a peer id is not a valid"):
            await apply(handler, session, step_request(hidden, step_id="x", previous_server="not a peer id"))
        await session.close()
        await handler.batcher.close()
        return await client.outputs(), session

    outputs, session = asyncio.run(run())
    assert len(outputs) == 1 and session.cache.position == 6  # only the named server's push was computed


def test_a_server_moving_to_other_blocks_ends_open_sessions_before_it_frees_its_blocks():
    """Sessions still open when a server moves held the old blocks and caches alive (and kept computing on them)
    while the new blocks loaded: they are ended, their clients told why, and the old blocks freed."""

    async def run():
        server_p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        client_p2p = await P2P.create(
            host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=await server_p2p.get_visible_maddrs()
        )
        try:
            blocks = load_blocks()
            freed = weakref.ref(blocks)
            handler = TransformerConnectionHandler(blocks, PREFIX, KVCachePool(2**26), max_length=64)
            await handler.start(server_p2p)
            del blocks
            _, reader, writer = await client_p2p.call_binary_stream_handler(server_p2p.peer_id, INFERENCE_HANDLE)
            writer.write(frame(step_request(torch.randn(1, 3, 256), max_length=16, step_id="a")))
            assert (await asyncio.wait_for(read_message(reader, runtime_pb2.ExpertResponse, 1 << 20), 30)).tensors
            server = SimpleNamespace(
                handler=handler, config=SimpleNamespace(shutdown_timeout=0.5), device=torch.device("cpu")
            )
            del handler
            await asyncio.wait_for(BlockServer._stop_handler(server), 30)
            with pytest.raises(RemoteError, match="moved to other blocks"):
                await asyncio.wait_for(read_message(reader, runtime_pb2.ExpertResponse, 1 << 20), 10)
            writer.close()
            gc.collect()
            assert freed() is None  # nothing holds the old blocks any more
        finally:
            await client_p2p.shutdown()
            await server_p2p.shutdown()

    asyncio.run(run())
