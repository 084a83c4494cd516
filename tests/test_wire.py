"""Validated (de)serialization of RPC metadata, tensors and Petals' args_structure (PROTOCOL.md, "RPC")."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer

from swarm.wire import (
    MAX_METADATA_BYTES,
    MAX_METADATA_TUPLE_DEPTH,
    MAX_STRUCTURE_ITEMS,
    MAX_TENSOR_DIMS,
    MAX_TENSOR_NUMEL,
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


@pytest.fixture
def hivemind_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog that also sees hivemind's loggers, which do not propagate to the root logger."""
    logger = logging.getLogger("hivemind")
    logger.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)


def test_hivemind_log_fixture_sees_hiveminds_warnings(hivemind_log: pytest.LogCaptureFixture) -> None:
    MSGPackSerializer.loads(msgpack.dumps(msgpack.ExtType(99, b"x")))
    assert [r for r in hivemind_log.records if "ExtType" in r.getMessage()]


def test_metadata_with_unknown_extension_types_is_refused_without_logging(
    hivemind_log: pytest.LogCaptureFixture,
) -> None:
    raw = msgpack.dumps({"step_id": msgpack.ExtType(99, b"x" * 10)})
    with pytest.raises(BadRequest, match="extension type 99"):
        loads_metadata(raw)
    assert not [r for r in hivemind_log.records if "ExtType" in r.getMessage()]


def _tuple_ext(*packed_items: bytes) -> msgpack.ExtType:
    """hivemind's tuple extension around already packed items."""
    assert len(packed_items) < 16
    return msgpack.ExtType(
        MSGPackSerializer._TUPLE_EXT_TYPE_CODE, bytes([0x90 + len(packed_items)]) + b"".join(packed_items)
    )


def test_unknown_extension_types_nested_in_tuples_are_refused_without_logging(
    hivemind_log: pytest.LogCaptureFixture,
) -> None:
    unknown = msgpack.dumps(msgpack.ExtType(99, b"x"))
    nested = msgpack.dumps(_tuple_ext(msgpack.dumps(1), msgpack.dumps(_tuple_ext(unknown))))
    raw = msgpack.dumps({"args_structure": _tuple_ext(nested, msgpack.dumps({}))})
    with pytest.raises(BadRequest, match="extension type 99"):
        loads_metadata(raw)
    assert not [r for r in hivemind_log.records if "ExtType" in r.getMessage()]


@pytest.mark.parametrize("code", [0x50, 0x51])  # hivemind's DHT dictionary and BatchTensorDescriptor
def test_hiveminds_other_extension_types_are_refused_in_requests(code: int) -> None:
    # Their decoders unpack nested data with hivemind's own hook: neither bounded nor quiet.
    raw = msgpack.dumps({"points": msgpack.ExtType(code, msgpack.dumps(msgpack.ExtType(99, b"")))})
    with pytest.raises(BadRequest, match=f"extension type {code}"):
        loads_metadata(raw)


def _nested_tuples(depth: int) -> bytes:
    packed = msgpack.dumps(1)
    for _ in range(depth):
        packed = msgpack.dumps(_tuple_ext(packed))
    return packed


def test_deeply_nested_tuples_are_refused() -> None:
    # Each level costs msgpack tens of KB of C stack: a few hundred levels (about 2 KB) crashed the process.
    raw = msgpack.dumps({"args_structure": msgpack.ExtType(0x40, b"\x91" + _nested_tuples(1000))})
    assert len(raw) < MAX_METADATA_BYTES
    with pytest.raises(BadRequest, match="deep"):
        loads_metadata(raw)


def test_tuples_nested_up_to_the_limit_are_kept() -> None:
    raw = b"\x81\xa1a" + _nested_tuples(MAX_METADATA_TUPLE_DEPTH)
    value = loads_metadata(raw)["a"]
    for _ in range(MAX_METADATA_TUPLE_DEPTH):
        assert isinstance(value, tuple) and len(value) == 1
        (value,) = value
    assert value == 1
    with pytest.raises(BadRequest, match="deep"):
        loads_metadata(b"\x81\xa1a" + _nested_tuples(MAX_METADATA_TUPLE_DEPTH + 1))


@pytest.mark.parametrize(
    "payload",
    [msgpack.dumps(5), msgpack.dumps({"a": 1}), b"\x91\x01\x02", b""],
    ids=["int", "dict", "trailing-bytes", "empty"],
)
def test_malformed_tuples_are_refused(payload: bytes) -> None:
    with pytest.raises(BadRequest):
        loads_metadata(msgpack.dumps({"a": msgpack.ExtType(0x40, payload)}))


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


# ----- which compressions are accepted -----

_COMPRESSION = runtime_pb2.CompressionType


@pytest.fixture
def hivemind_calls(monkeypatch: pytest.MonkeyPatch) -> list[runtime_pb2.Tensor]:
    """Every message that swarm.wire hands to hivemind's deserializer."""
    import swarm.wire

    calls: list[runtime_pb2.Tensor] = []

    def spy(proto: runtime_pb2.Tensor) -> torch.Tensor:
        calls.append(proto)
        return deserialize_torch_tensor(proto)

    monkeypatch.setattr(swarm.wire, "deserialize_torch_tensor", spy)
    return calls


def _copy(proto: runtime_pb2.Tensor) -> runtime_pb2.Tensor:
    return runtime_pb2.Tensor.FromString(proto.SerializeToString())


def _resized(proto: runtime_pb2.Tensor, delta: int) -> runtime_pb2.Tensor:
    proto = _copy(proto)
    proto.buffer = proto.buffer + b"\x00" * delta if delta > 0 else proto.buffer[:delta]
    return proto


@pytest.mark.parametrize("name", ["QUANTILE_8BIT", "UNIFORM_8BIT", "BLOCKWISE_8BIT"])
def test_8bit_compressions_are_refused_by_name(name: str, hivemind_calls: list) -> None:
    valid = serialize_torch_tensor(torch.randn(4, 256), _COMPRESSION.Value(name))
    hostile = _resized(valid, -(len(valid.buffer) - 8))  # e.g. a codebook length past the buffer's end
    for proto in (valid, hostile):
        with pytest.raises(BadRequest, match=f"tensor 0 cannot be deserialized: compression {name} is not accepted"):
            deserialize([proto])
    assert hivemind_calls == []


def test_unknown_compression_values_are_refused(hivemind_calls: list) -> None:
    proto = serialize(torch.zeros(2))
    proto.compression = 99
    with pytest.raises(BadRequest, match="compression 99 is not accepted"):
        deserialize([proto])
    assert hivemind_calls == []


@pytest.mark.parametrize(
    ("compression", "tensor"),
    [
        ("FLOAT16", torch.randn(2, 3, 8)),
        ("FLOAT16", torch.randn(5).to(torch.float64)),
        ("MEANSTD_16BIT", torch.randn(2, 3, 8)),
        ("MEANSTD_16BIT", torch.randn(4, 16).to(torch.float16)),
        ("NONE", torch.randn(2, 3).to(torch.bfloat16)),
    ],
)
@pytest.mark.parametrize("delta", [-1, 1, -2, 2, -8, 8])
def test_wrongly_sized_buffers_are_refused_before_hivemind(
    compression: str, tensor: torch.Tensor, delta: int, hivemind_calls: list
) -> None:
    proto = _resized(serialize_torch_tensor(tensor, _COMPRESSION.Value(compression)), delta)
    with pytest.raises(BadRequest, match=f"do not hold a .* with compression {compression}"):
        deserialize([proto])
    assert hivemind_calls == []


def test_meanstd_without_its_statistics_is_refused(hivemind_calls: list) -> None:
    proto = serialize_torch_tensor(torch.randn(3, 8), _COMPRESSION.MEANSTD_16BIT)
    proto.buffer = proto.buffer[: 3 * 8 * 2]  # the float16 values alone
    with pytest.raises(BadRequest, match="do not hold"):
        deserialize([proto])
    assert hivemind_calls == []


@pytest.mark.parametrize(
    "proto",
    [
        # Compressed integers, and compressed bfloat16 (hivemind's compressors refuse to make either).
        runtime_pb2.Tensor(buffer=b"\x00" * 4, size=[2], dtype="int64", compression=_COMPRESSION.FLOAT16),
        runtime_pb2.Tensor(buffer=b"\x00" * 4, size=[2], dtype="bfloat16", compression=_COMPRESSION.FLOAT16),
        runtime_pb2.Tensor(buffer=b"\x00" * 12, size=[2], dtype="int64", compression=_COMPRESSION.MEANSTD_16BIT),
        # MEANSTD of a scalar: there is no last dimension to take statistics over.
        runtime_pb2.Tensor(buffer=b"\x00" * 10, size=[], dtype="float32", compression=_COMPRESSION.MEANSTD_16BIT),
        # Dtypes no Petals peer sends.
        runtime_pb2.Tensor(buffer=b"\x00" * 2, size=[2], dtype="bool"),
        runtime_pb2.Tensor(buffer=b"\x00" * 16, size=[2], dtype="complex64"),
        runtime_pb2.Tensor(buffer=b"\x00" * 8, size=[1], dtype="object"),
        runtime_pb2.Tensor(buffer=b"\x00" * 8, size=[1], dtype="<f8"),
    ],
)
def test_unaccepted_dtypes_are_refused_before_hivemind(proto: runtime_pb2.Tensor, hivemind_calls: list) -> None:
    with pytest.raises(BadRequest, match="is not accepted"):
        deserialize([proto])
    assert hivemind_calls == []


@pytest.mark.parametrize(
    ("size", "match"),
    [
        ([1] * (MAX_TENSOR_DIMS + 1), "dimensions"),
        ([2**16] * 4, "elements"),  # 2**64 elements: torch.Size.numel() wraps this around to 0
        ([2**32 - 1] * 3, "elements"),
        ([MAX_TENSOR_NUMEL + 1], "elements"),
    ],
)
def test_huge_shapes_are_refused(size: list[int], match: str, hivemind_calls: list) -> None:
    for compression in ("NONE", "FLOAT16", "MEANSTD_16BIT"):
        for buffer in (b"", b"\x00" * 4):
            proto = runtime_pb2.Tensor(
                buffer=buffer, size=size, dtype="float32", compression=_COMPRESSION.Value(compression)
            )
            with pytest.raises(BadRequest, match=match):
                deserialize([proto])
    assert hivemind_calls == []


def test_the_most_dimensions_are_accepted() -> None:
    tensor = torch.randn([1, 2] * (MAX_TENSOR_DIMS // 2))
    (restored,) = deserialize([serialize(tensor)])
    assert torch.equal(restored, tensor)


_ACCEPTED_KINDS = [
    ("NONE", torch.randn(2, 3, 8)),
    ("NONE", torch.randn(3).to(torch.float16)),
    ("NONE", torch.randn(3).to(torch.float64)),
    ("NONE", torch.tensor([[-3, 7]], dtype=torch.int64)),
    ("NONE", torch.tensor([-3, 7], dtype=torch.int32)),
    ("NONE", torch.tensor([-3, 7], dtype=torch.int16)),
    ("NONE", torch.tensor([-3, 7], dtype=torch.int8)),
    ("NONE", torch.tensor([3, 250], dtype=torch.uint8)),
    ("NONE", torch.randn(2, 3, 8).to(torch.bfloat16)),
    ("NONE", torch.empty(0, 4, dtype=torch.bfloat16)),
    ("NONE", torch.empty(0)),
    ("FLOAT16", torch.randn(2, 3, 8)),
    ("FLOAT16", torch.randn(2, 3).to(torch.float16)),
    ("FLOAT16", torch.randn(7).to(torch.float64)),
    ("FLOAT16", torch.empty(0, 3)),
    ("MEANSTD_16BIT", torch.randn(2, 3, 8)),
    ("MEANSTD_16BIT", torch.randn(2, 16).to(torch.float16)),
    ("MEANSTD_16BIT", torch.randn(5).to(torch.float64)),
    ("MEANSTD_16BIT", torch.empty(0, 8)),
]


def _serialized_kinds(legacy_bfloat16: bool) -> list[tuple[str, runtime_pb2.Tensor]]:
    import hivemind.compression.base

    old, hivemind.compression.base.USE_LEGACY_BFLOAT16 = hivemind.compression.base.USE_LEGACY_BFLOAT16, legacy_bfloat16
    try:
        return [(c, serialize_torch_tensor(t, _COMPRESSION.Value(c))) for c, t in _ACCEPTED_KINDS]
    finally:
        hivemind.compression.base.USE_LEGACY_BFLOAT16 = old


def _assert_same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("legacy_bfloat16", [True, False])  # bfloat16 as float32 values, or its own 2 bytes
@pytest.mark.parametrize("index", range(len(_ACCEPTED_KINDS)))
def test_accepted_kinds_deserialize_as_hivemind_does(index: int, legacy_bfloat16: bool) -> None:
    from hivemind.utils.streaming import split_for_streaming

    from swarm.wire import deserialize_streamed

    compression, proto = _serialized_kinds(legacy_bfloat16)[index]
    expected = deserialize_torch_tensor(_copy(proto))
    (restored,) = deserialize([_copy(proto)])
    _assert_same(restored, expected)
    parts = list(split_for_streaming(_copy(proto), chunk_size_bytes=16))
    (streamed,) = deserialize_streamed(parts)
    _assert_same(streamed, expected)


@pytest.mark.parametrize(
    "proto",
    [
        serialize_torch_tensor(torch.randn(4, 256), _COMPRESSION.BLOCKWISE_8BIT),
        _resized(serialize_torch_tensor(torch.randn(4, 64), _COMPRESSION.FLOAT16), -2),
        _resized(serialize_torch_tensor(torch.randn(4, 64), _COMPRESSION.MEANSTD_16BIT), 4),
    ],
)
def test_streamed_tensors_are_checked_before_hivemind(proto: runtime_pb2.Tensor, hivemind_calls: list) -> None:
    from hivemind.utils.streaming import split_for_streaming

    from swarm.wire import deserialize_streamed

    parts = [*split_for_streaming(serialize(torch.zeros(3)), 64), *split_for_streaming(_copy(proto), 64)]
    assert len(parts) > 3
    with pytest.raises(BadRequest, match="streamed tensor 1 cannot be reassembled: .*(not accepted|do not hold)"):
        deserialize_streamed(parts)
    assert hivemind_calls == []
