"""Bad input to every RPC gets a clear error, and the server goes on serving the next client."""

from __future__ import annotations

import asyncio
import inspect
import time

import pytest
import torch
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer

from swarm import AutoDistributedModelForCausalLM
from swarm.client.event_loop import run_sync
from swarm.names import block_uids, join_chain
from swarm.server.handler import INFERENCE_HANDLE, TransformerConnectionHandler
from swarm.streams import BlockingStream, RemoteError, close_when_peer_ends, read_message
from swarm.wire import deserialize, pack_args, serialize
from tests.conftest import DEMO_MODEL, client_peer, start_swarm

pytestmark = pytest.mark.integration

PREFIX = "demo_model-hf"
HIDDEN = 256
MAX_LENGTH = 64


@pytest.fixture(scope="module")
def swarm(make_swarm):
    swarm = start_swarm(make_swarm, "0:8", extra=("--max-length", str(MAX_LENGTH)))
    yield swarm
    swarm.close()


@pytest.fixture(scope="module")
def client(swarm):
    with client_peer(swarm) as peer:
        yield peer


@pytest.fixture(scope="module")
def stub(client):
    return TransformerConnectionHandler.get_stub(*client)


def call(coro):
    return run_sync(coro, timeout=60)


def request(uid: str, tensors: list[torch.Tensor], metadata: dict | bytes) -> runtime_pb2.ExpertRequest:
    raw = metadata if isinstance(metadata, bytes) else MSGPackSerializer.dumps(metadata)
    return runtime_pb2.ExpertRequest(uid=uid, tensors=[serialize(t) for t in tensors], metadata=raw)


async def inference(client, requests: list[runtime_pb2.ExpertRequest]) -> list[runtime_pb2.ExpertResponse]:
    """A session through hivemind's own protobuf stream client, as Petals clients open them."""

    async def stream():
        for item in requests:
            yield item
            await asyncio.sleep(0)

    p2p, peer_id = client
    responses = await p2p.iterate_protobuf_handler(peer_id, INFERENCE_HANDLE, stream(), runtime_pb2.ExpertResponse)
    return [response async for response in responses]


ALL = join_chain(block_uids(PREFIX, 0, 8))
LINGER_SECONDS = inspect.signature(close_when_peer_ends).parameters["linger"].default


def hidden(tokens: int = 3) -> torch.Tensor:
    return torch.randn(1, tokens, HIDDEN)


def step(tensor: torch.Tensor, **metadata) -> runtime_pb2.ExpertRequest:
    tensors, structure = pack_args([tensor, torch.empty(0), torch.empty(0, dtype=torch.int64)])
    return request(ALL, tensors, {"args_structure": structure, **metadata})


@pytest.mark.parametrize(
    ("make_request", "message"),
    [
        (lambda: request("other_model.0", [hidden()], {}), "not served here"),
        (lambda: request(f"{PREFIX}.99", [hidden()], {}), "not served here"),
        (lambda: request("no-dot-here", [hidden()], {}), "malformed block uid"),
        (lambda: request(f"{PREFIX}.0 {PREFIX}.2", [hidden()], {}), "consecutive"),
        (lambda: request(ALL, [torch.randn(1, 3, 7)], {}), "shape"),
        (lambda: request(ALL, [torch.ones(1, 3, HIDDEN, dtype=torch.int64)], {}), "floating-point"),
        (lambda: request(ALL, [hidden()], b"\xc1\xff not msgpack"), "msgpack"),
        (lambda: request(ALL, [hidden()], MSGPackSerializer.dumps([1, 2])), "dict"),
        (lambda: request(ALL, [hidden()], {"args_structure": [[b"__T5"], {}]}), "missing tensor"),
        (lambda: request(ALL, [], {}), "needs"),
    ],
)
def test_bad_forward_requests_get_clear_errors(stub, make_request, message):
    with pytest.raises(Exception, match=message):
        call(stub.rpc_forward(make_request(), timeout=20))


def test_garbage_tensor_bytes(stub):
    garbage = runtime_pb2.Tensor(buffer=b"\x00\x01\x02", size=[1, 3, HIDDEN], dtype="float32")
    bad = runtime_pb2.ExpertRequest(uid=ALL, tensors=[garbage], metadata=b"")
    with pytest.raises(Exception, match="cannot be deserialized"):
        call(stub.rpc_forward(bad, timeout=20))


def test_inference_requires_sane_max_length(client):
    with pytest.raises(Exception, match="max_length"):
        call(inference(client, [step(hidden())]))  # no max_length at all
    with pytest.raises(Exception, match=f"between 1 and {MAX_LENGTH}"):
        call(inference(client, [step(hidden(), max_length=MAX_LENGTH + 1)]))
    with pytest.raises(Exception, match="max_length"):
        call(inference(client, [step(hidden(), max_length="ten")]))


def test_inference_refuses_a_step_past_max_length(client):
    requests = [step(hidden(6), max_length=8, step_id="a"), step(hidden(3), step_id="b")]
    with pytest.raises(Exception, match="past the session's max_length=8"):
        call(inference(client, requests))


def test_inference_rejects_bad_rewind_and_hypo_ids(client):
    with pytest.raises(Exception, match="start_from_position"):
        call(inference(client, [step(hidden(2), max_length=8, step_id="a"), step(hidden(1), start_from_position=5)]))
    tensors, structure = pack_args([hidden(1), torch.empty(0), torch.tensor([3])])
    bad_hypo = request(ALL, tensors, {"args_structure": structure, "max_length": 8})
    with pytest.raises(Exception, match="hypo_ids"):
        call(inference(client, [bad_hypo]))


def test_repeated_step_ids_are_computed_once(client):
    """A step whose id was seen is skipped: not answered, and neither written to the cache nor moving its
    position (a push and the client's own copy of a step carry one id)."""
    first, repeated, second = hidden(2), hidden(1), hidden(1)
    fill = hidden(8 - 3)  # exactly up to max_length from position 3: refused at position 4
    with_repeat = call(
        inference(
            client,
            [
                step(first, max_length=8, step_id="one"),
                step(repeated, step_id="one"),
                step(second, step_id="two"),
                step(fill, step_id="three"),
            ],
        )
    )
    reference = call(
        inference(
            client,
            [step(first, max_length=8, step_id="one"), step(second, step_id="two"), step(fill, step_id="three")],
        )
    )
    assert len(with_repeat) == 3  # the repeat got no answer, and the fill fit: the position was 3, not 4
    for got, expected in zip(with_repeat, reference):
        # The same values as without the repeat: it left nothing in the cache the later steps attend to.
        torch.testing.assert_close(deserialize(got.tensors)[0], deserialize(expected.tensors)[0], atol=1e-5, rtol=0)


def test_rpc_info_describes_the_server_and_a_block(stub):
    info = MSGPackSerializer.loads(call(stub.rpc_info(runtime_pb2.ExpertUID(uid=""), timeout=20)).serialized_info)
    assert set(info) >= {"version", "dht_client_mode", "cache_tokens_available"}
    block = MSGPackSerializer.loads(
        call(stub.rpc_info(runtime_pb2.ExpertUID(uid=f"{PREFIX}.3"), timeout=20)).serialized_info
    )
    assert set(block) >= {"forward_schema", "outputs_schema", "keyword_names", "inference_schema"}
    with pytest.raises(Exception, match="not served"):
        call(stub.rpc_info(runtime_pb2.ExpertUID(uid="nope.1"), timeout=20))


def test_server_still_serves_after_bad_requests(swarm, stub):
    for _ in range(3):
        with pytest.raises(Exception, match="shape"):
            call(stub.rpc_forward(request(ALL, [torch.randn(2, 2)], {}), timeout=20))
    model = AutoDistributedModelForCausalLM.from_pretrained(DEMO_MODEL, initial_peers=swarm.initial_peers)
    try:
        output = model.generate(torch.tensor([[1, 50, 60]]), max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert output.shape == (1, 7)
    finally:
        model.close()


def raw_inference_stream(client, data: bytes) -> runtime_pb2.ExpertResponse | None:
    """Bytes straight onto an rpc_inference stream, and the server's first answer."""

    async def go():
        p2p, peer_id = client
        _, reader, writer = await p2p.call_binary_stream_handler(peer_id, INFERENCE_HANDLE)
        try:
            writer.write(data)
            await writer.drain()
            return await read_message(reader, runtime_pb2.ExpertResponse, 1 << 20)
        finally:
            writer.close()

    return call(go())


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x05" + bytes(8), "unknown frame marker"),
        (b"\x00" + (2**62).to_bytes(8, "big"), "larger than the limit"),
        (b"\x00" + (4).to_bytes(8, "big") + b"\xff\xff\xff\xff", "not a valid ExpertRequest"),
    ],
)
def test_malformed_frames_get_clear_errors(client, data, message):
    with pytest.raises(RemoteError, match=message):
        raw_inference_stream(client, data)


def test_pushed_steps_are_answered_on_the_clients_stream(client, stub):
    """rpc_push computes a step at once; the client's own copy is dropped; a bad push harms nothing."""
    p2p, peer_id = client
    stream = BlockingStream(p2p, peer_id, INFERENCE_HANDLE, timeout=10)

    def answer(timeout: float = 20) -> runtime_pb2.ExpertResponse | None:
        return stream.receive(runtime_pb2.ExpertResponse, 1 << 20, timeout)

    pusher = p2p.peer_id.to_base58()  # here the client pushes too: it names itself as the previous server
    try:
        stream.send(step(hidden(2), max_length=16, session_id="push-test", step_id="a", previous_server=pusher), 10)
        assert answer().tensors
        with pytest.raises(Exception, match="shape"):
            call(stub.rpc_push(request(ALL, [torch.randn(1, 1, 7)], {"session_id": "push-test"}), timeout=20))
        ignored = call(stub.rpc_push(step(hidden(1), session_id="someone-else", step_id="b"), timeout=20))
        assert not ignored.tensors  # as Petals does: a push for an unknown session is dropped quietly

        call(stub.rpc_push(step(hidden(1), session_id="push-test", step_id="b"), timeout=20))
        assert answer().tensors  # the pushed step's outputs, before the client sent it
        stream.send(step(hidden(1), session_id="push-test", step_id="b"), 10)  # the client's copy
        stream.send(step(hidden(1), session_id="push-test", step_id="c"), 10)
        assert answer().tensors  # step c; step b was not computed twice
        with pytest.raises(TimeoutError):
            answer(timeout=0.5)
    finally:
        stream.close()


def test_a_session_ended_by_the_client_closes_at_once(client):
    """After a Petals-style end-of-stream the server closes right away (it lingers only when it
    stops first, so that its last error frame is not lost): the client is not kept waiting."""
    began = time.monotonic()
    responses = call(inference(client, [step(hidden(2), max_length=8, step_id="a"), step(hidden(1), step_id="b")]))
    assert len(responses) == 2
    assert time.monotonic() - began < LINGER_SECONDS / 2


def test_after_the_first_step_a_frame_larger_than_any_step_of_the_session_is_refused_unread(client):
    """A session of one row and max_length 16 can send at most 16 tokens a step (about 16 KB): a frame
    claiming 10 MB (within what a first request to 8 blocks may be) is refused from its header."""
    p2p, peer_id = client
    stream = BlockingStream(p2p, peer_id, INFERENCE_HANDLE, timeout=10)
    try:
        stream.send(step(hidden(2), max_length=16, step_id="a"), 10)
        assert stream.receive(runtime_pb2.ExpertResponse, 1 << 20, 20).tensors
        stream._socket.sendall(b"\x00" + (10 * 2**20).to_bytes(8, "big") + bytes(2**16))
        with pytest.raises(RemoteError, match="larger than the limit"):
            stream.receive(runtime_pb2.ExpertResponse, 1 << 20, 20)
    finally:
        stream.close()
