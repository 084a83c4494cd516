"""Validated (de)serialization of RPC metadata, tensors and Petals' args_structure (PROTOCOL.md, "RPC")."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer

from swarm.wire import (
    MAX_METADATA_BYTES,
    MAX_STRUCTURE_ITEMS,
    BadRequest,
    deserialize,
    dumps_metadata,
    expert_request,
    loads_metadata,
    pack_args,
    serialize,
    unpack_args,
)


def test_bad_request_is_a_value_error() -> None:
    assert issubclass(BadRequest, ValueError)


# ----- metadata -----


def test_metadata_round_trip() -> None:
    metadata = {
        "max_length": 128,
        "session_id": "abc",
        "step_id": "s1",
        "args_structure": ((b"__T0", b"__T1", b"__T2"), {}),
        "next_servers": [["QmPeer", "sess", 0, 4]],
        "start_from_position": 3,
    }
    assert loads_metadata(dumps_metadata(metadata)) == metadata


def test_empty_metadata_is_an_empty_dict() -> None:
    assert loads_metadata(b"") == {}


@pytest.mark.parametrize("value", [[1, 2], "text", 5, None, (1, 2), b"bytes"])
def test_loads_metadata_rejects_non_dict(value: Any) -> None:
    with pytest.raises(BadRequest, match="dict"):
        loads_metadata(MSGPackSerializer.dumps(value))


@pytest.mark.parametrize("raw", [b"\xc1", b"\x92\x01", b"\xde\xff\xff", b"\x81\xa1", b"\xd9\x05ab"])
def test_loads_metadata_rejects_garbage(raw: bytes) -> None:
    with pytest.raises(BadRequest):
        loads_metadata(raw)


def test_loads_metadata_rejects_oversize() -> None:
    raw = MSGPackSerializer.dumps({"pad": "x" * MAX_METADATA_BYTES})
    assert len(raw) > MAX_METADATA_BYTES
    with pytest.raises(BadRequest, match="larger"):
        loads_metadata(raw)


def test_loads_metadata_accepts_just_under_the_limit() -> None:
    raw = MSGPackSerializer.dumps({"pad": "x" * (MAX_METADATA_BYTES - 100)})
    assert len(raw) <= MAX_METADATA_BYTES
    assert len(loads_metadata(raw)["pad"]) == MAX_METADATA_BYTES - 100


def test_loads_metadata_rejects_deep_nesting() -> None:
    raw = b"\x91" * 5000 + b"\x00"  # 5000 nested one-element arrays: msgpack refuses to go that deep
    with pytest.raises(BadRequest):
        loads_metadata(raw)


def test_loads_metadata_rejects_trailing_bytes() -> None:
    with pytest.raises(BadRequest):
        loads_metadata(msgpack.dumps({"a": 1}) + b"\x00")


# ----- args_structure -----


def _tensors(n: int) -> list[torch.Tensor]:
    return [torch.full((1, 2), float(i)) for i in range(n)]


def test_pack_args_gives_petals_structure() -> None:
    tensors = _tensors(3)
    flat, structure = pack_args(tensors)
    assert flat is tensors
    assert structure == [[b"__T0", b"__T1", b"__T2"], {}]


def test_pack_unpack_round_trip_through_msgpack() -> None:
    tensors = _tensors(3)
    flat, structure = pack_args(tensors)
    structure = loads_metadata(dumps_metadata({"args_structure": structure}))["args_structure"]
    args = unpack_args(flat, structure)
    assert len(args) == 3 and all(a is t for a, t in zip(args, tensors))


@pytest.mark.parametrize(
    "structure",
    [
        [[b"__T0", b"__T1", b"__T2"], {}],
        ((b"__T0", b"__T1", b"__T2"), {}),  # what Petals sends: (args tuple, kwargs dict)
        [(b"__T0", b"__T1", b"__T2"), {}],
    ],
)
def test_unpack_petals_structure(structure: Any) -> None:
    tensors = _tensors(3)
    structure = MSGPackSerializer.loads(MSGPackSerializer.dumps(structure))
    assert unpack_args(tensors, structure) == tensors


def test_unpack_args_reorders_and_repeats() -> None:
    a, b = _tensors(2)
    args = unpack_args([a, b], [[b"__T1", None, b"__T0", b"__T1"], {}])
    assert args[0] is b and args[1] is None and args[2] is a and args[3] is b


def test_unpack_args_without_structure_is_the_flat_list() -> None:
    tensors = _tensors(2)
    assert unpack_args(tensors, None) == tensors


def test_unpack_args_allows_fewer_refs_than_tensors() -> None:
    tensors = _tensors(3)
    assert unpack_args(tensors, [[b"__T2"], {}]) == [tensors[2]]


@pytest.mark.parametrize(
    "item",
    [b"__T3", b"__T99999999999999999999", b"__T-1", b"__T", b"__T1x", b"__T 1", b"__T\xd9\xa3"],
)
def test_unpack_args_rejects_bad_refs(item: bytes) -> None:
    with pytest.raises(BadRequest, match="missing tensor"):
        unpack_args(_tensors(3), [[item], {}])


@pytest.mark.parametrize("item", ["__T0", 0, 1.5, [b"__T0"], {"t": b"__T0"}, b"T0", b"xx__T0", True])
def test_unpack_args_rejects_non_tensor_items(item: Any) -> None:
    with pytest.raises(BadRequest):
        unpack_args(_tensors(1), [[item], {}])


@pytest.mark.parametrize(
    "structure",
    [
        b"__T0",
        "args",
        5,
        {},
        {"args": [b"__T0"]},
        [],
        [[b"__T0"]],
        [[b"__T0"], {}, {}],
        [b"__T0", {}],
        [{b"__T0": 1}, {}],
        [[b"__T0"] * (MAX_STRUCTURE_ITEMS + 1), {}],
    ],
)
def test_unpack_args_rejects_bad_structure_shapes(structure: Any) -> None:
    with pytest.raises(BadRequest, match="args_structure"):
        unpack_args(_tensors(1), structure)


def test_unpack_args_accepts_max_items() -> None:
    args = unpack_args(_tensors(1), [[b"__T0"] * MAX_STRUCTURE_ITEMS, {}])
    assert len(args) == MAX_STRUCTURE_ITEMS


# ----- tensors -----


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(2, 3, 8),
        torch.randn(2, 3).to(torch.bfloat16),
        torch.randn(4).to(torch.float16),
        torch.tensor([2, 0, 1], dtype=torch.int64),
        torch.empty(0),
        torch.empty(0, dtype=torch.int64),
    ],
)
def test_serialize_deserialize_round_trip(tensor: torch.Tensor) -> None:
    (restored,) = deserialize([serialize(tensor)])
    assert restored.dtype == tensor.dtype and restored.shape == tensor.shape
    assert torch.equal(restored, tensor)


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(1, 3, 8),
        torch.randn(4).to(torch.float16),
        torch.tensor([2, 0, 1]),
        torch.empty(0),
        torch.zeros(2, 0),
    ],
)
def test_fast_path_speaks_hiveminds_format(tensor: torch.Tensor) -> None:
    """Plain dtypes skip hivemind's serializer, so check both directions against it."""
    ours, theirs = serialize(tensor), serialize_torch_tensor(tensor)
    assert ours.SerializeToString() == theirs.SerializeToString()
    assert torch.equal(deserialize_torch_tensor(ours), tensor)
    (restored,) = deserialize([theirs])
    assert restored.shape == tensor.shape and torch.equal(restored, tensor)
    restored += 1  # a writable tensor of its own, not a view of the message's bytes


def test_serialize_detaches() -> None:
    tensor = torch.randn(2, requires_grad=True) * 2
    (restored,) = deserialize([serialize(tensor)])
    assert not restored.requires_grad
    assert torch.equal(restored, tensor.detach())


@pytest.mark.parametrize(
    "proto",
    [
        runtime_pb2.Tensor(buffer=b"\x00" * 7, size=[2], dtype="float32"),  # buffer not a multiple of the dtype
        runtime_pb2.Tensor(buffer=b"\x00" * 8, size=[3, 3], dtype="float32"),  # shape does not match
        runtime_pb2.Tensor(buffer=b"\x00" * 8, size=[2], dtype="no-such-dtype"),
        runtime_pb2.Tensor(buffer=b"\x00" * 8, size=[1], dtype="object"),
        runtime_pb2.Tensor(buffer=b"\x00" * 8, size=[2], dtype=""),
        runtime_pb2.Tensor(buffer=b"\x00" * 4, size=[2**31 - 1], dtype="float32"),
        runtime_pb2.Tensor(buffer=b"\x00" * 3, size=[2], dtype="bfloat16"),
        runtime_pb2.Tensor(
            buffer=b"\x00" * 3, size=[4], dtype="float32", compression=runtime_pb2.CompressionType.FLOAT16
        ),
        runtime_pb2.Tensor(
            buffer=b"\x00\x01", size=[64], dtype="float32", compression=runtime_pb2.CompressionType.UNIFORM_8BIT
        ),
        runtime_pb2.Tensor(
            buffer=b"\x00\x01", size=[64], dtype="float32", compression=runtime_pb2.CompressionType.QUANTILE_8BIT
        ),
    ],
)
def test_deserialize_rejects_garbage(proto: runtime_pb2.Tensor) -> None:
    with pytest.raises(BadRequest, match="cannot be deserialized"):
        deserialize([serialize_torch_tensor(torch.zeros(1)), proto])


def test_deserialize_names_the_bad_tensor_index() -> None:
    bad = runtime_pb2.Tensor(buffer=b"\x00" * 5, size=[2], dtype="float32")
    with pytest.raises(BadRequest, match="tensor 1 "):
        deserialize([serialize(torch.zeros(2)), bad])


def test_deserialize_rejects_too_many_tensors() -> None:
    protos = [serialize(torch.zeros(1)) for _ in range(9)]
    with pytest.raises(BadRequest, match="at most 8"):
        deserialize(protos)
    assert len(deserialize(protos, max_tensors=9)) == 9


def test_expert_request_round_trip() -> None:
    tensors = [torch.randn(1, 2, 4), torch.empty(0), torch.empty(0, dtype=torch.int64)]
    flat, structure = pack_args(tensors)
    request = expert_request("m.0 m.1", flat, {"max_length": 16, "args_structure": structure})
    parsed = runtime_pb2.ExpertRequest.FromString(request.SerializeToString())
    assert parsed.uid == "m.0 m.1"
    metadata = loads_metadata(parsed.metadata)
    assert metadata["max_length"] == 16
    args = unpack_args(deserialize(parsed.tensors), metadata["args_structure"])
    assert all(torch.equal(a, t) and a.dtype == t.dtype for a, t in zip(args, tensors))


def test_metadata_with_unknown_extension_types_is_refused_without_logging(caplog) -> None:
    raw = msgpack.dumps({"step_id": msgpack.ExtType(99, b"x" * 10)})
    with pytest.raises(BadRequest, match="extension type 99"):
        loads_metadata(raw)
    assert not [r for r in caplog.records if "ExtType" in r.getMessage()]


def test_streamed_tensors_are_reassembled_in_order() -> None:
    from hivemind.utils.streaming import split_for_streaming

    from swarm.wire import deserialize_streamed

    big, empty, small = torch.randn(64, 300), torch.empty(0), torch.arange(5.0)
    parts = [part for t in (big, empty, small) for part in split_for_streaming(serialize_torch_tensor(t), 4096)]
    assert len(parts) > 3
    restored = deserialize_streamed(parts)
    assert [t.shape for t in restored] == [big.shape, empty.shape, small.shape]
    assert torch.equal(restored[0], big) and torch.equal(restored[2], small)


def test_garbage_streamed_chunks_are_a_bad_request() -> None:
    from swarm.wire import deserialize_streamed

    with pytest.raises(BadRequest, match="streamed tensor 0"):
        deserialize_streamed([runtime_pb2.Tensor(buffer=b"\x01\x02", size=[4, 4], dtype="float32", chunks=1)])
