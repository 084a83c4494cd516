"""Turning RPC messages into validated tensors and metadata, and back (PROTOCOL.md, "RPC").

Everything here treats its input as hostile: bounded sizes, checked types, and a
`BadRequest` with a readable message instead of an obscure exception.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import msgpack
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer
from hivemind.utils.streaming import combine_from_streaming

MAX_METADATA_BYTES = 64 * 1024
MAX_STRUCTURE_ITEMS = 64
MAX_METADATA_TUPLE_DEPTH = 8  # Petals' args_structure nests two deep
MAX_TENSOR_DIMS = 8  # Petals sends at most 4 (deep prompts)
MAX_TENSOR_NUMEL = 2**31 - 1
TENSOR_MARK = b"__T"


class BadRequest(ValueError):
    """The request is malformed; the message says how."""


def dumps_metadata(metadata: dict[str, Any]) -> bytes:
    return MSGPackSerializer.dumps(metadata)


def loads_metadata(raw: bytes) -> dict[str, Any]:
    if not raw:
        return {}
    if len(raw) > MAX_METADATA_BYTES:
        raise BadRequest(f"metadata is larger than {MAX_METADATA_BYTES} bytes")
    try:
        metadata = msgpack.loads(raw, ext_hook=_strict_ext_hook, raw=False)
    except BadRequest:
        raise
    except Exception as e:
        raise BadRequest(f"metadata is not valid msgpack ({type(e).__name__})") from None
    if not isinstance(metadata, dict):
        raise BadRequest("metadata must be a msgpack dict")
    return metadata


def _strict_ext_hook(code: int, data: bytes, depth: int = 0) -> Any:
    # Requests carry only hivemind's tuple extension. Its payload is decoded here again, with this hook:
    # hivemind's own hook logs a warning per unknown type (log flooding), and each nesting level costs
    # tens of KB of C stack in msgpack, so a few hundred levels would crash the process.
    if code != MSGPackSerializer._TUPLE_EXT_TYPE_CODE:
        raise BadRequest(f"metadata uses an unaccepted msgpack extension type {code}")
    if depth >= MAX_METADATA_TUPLE_DEPTH:
        raise BadRequest(f"metadata nests tuples more than {MAX_METADATA_TUPLE_DEPTH} deep")
    items = msgpack.unpackb(data, ext_hook=functools.partial(_strict_ext_hook, depth=depth + 1), raw=False)
    if not isinstance(items, list):
        raise BadRequest("metadata holds a malformed tuple")
    return tuple(items)


# Uncompressed tensors of these types are (de)serialized here, without hivemind's per-tensor
# descriptors: the same bytes, a fraction of the time on every inference step. The other accepted
# kinds (bfloat16 and its legacy float32 encoding, 16-bit compressions) go through hivemind.
_PLAIN_DTYPES = {
    name: getattr(torch, name) for name in ("float32", "float16", "float64", "int64", "int32", "int16", "int8", "uint8")
}
_NONE = runtime_pb2.CompressionType.NONE


def serialize(tensor: torch.Tensor) -> runtime_pb2.Tensor:
    tensor = tensor.detach().cpu()
    name = str(tensor.dtype)[len("torch.") :]
    if name not in _PLAIN_DTYPES:
        return serialize_torch_tensor(tensor)
    return runtime_pb2.Tensor(
        compression=_NONE, buffer=tensor.numpy().tobytes(), size=tensor.shape, dtype=name, requires_grad=False
    )


def deserialize(tensors: list[runtime_pb2.Tensor] | Any, max_tensors: int = 8) -> list[torch.Tensor]:
    if len(tensors) > max_tensors:
        raise BadRequest(f"expected at most {max_tensors} tensors, got {len(tensors)}")
    result = []
    for i, proto in enumerate(tensors):
        try:
            result.append(_deserialize_one(proto))
        except BadRequest as e:
            raise BadRequest(f"tensor {i} cannot be deserialized: {e}") from None
        except Exception as e:
            raise BadRequest(f"tensor {i} cannot be deserialized ({type(e).__name__})") from None
    return result


def _deserialize_one(proto: runtime_pb2.Tensor) -> torch.Tensor:
    _check_tensor_message(proto)
    dtype = _PLAIN_DTYPES.get(proto.dtype) if proto.compression == _NONE else None
    if dtype is None:
        return deserialize_torch_tensor(proto)
    shape = torch.Size(proto.size)
    if not proto.buffer:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(proto.buffer), dtype=dtype).reshape(shape)


def _check_tensor_message(proto: runtime_pb2.Tensor) -> None:
    """Refuse a tensor unless its buffer has exactly the bytes its shape, dtype and compression call for.

    Runs before hivemind sees the message: its decoders trust the peer's sizes (the 8-bit ones hand a
    peer-chosen codebook length to a native kernel), so only what Petals peers send gets through.
    """
    if len(proto.size) > MAX_TENSOR_DIMS:
        raise BadRequest(f"a tensor may have at most {MAX_TENSOR_DIMS} dimensions, not {len(proto.size)}")
    numel = math.prod(proto.size)  # Python ints: torch.Size.numel() wraps around on huge shapes
    if numel > MAX_TENSOR_NUMEL:
        raise BadRequest(f"a tensor may have at most {MAX_TENSOR_NUMEL} elements")
    allowed = _allowed_buffer_sizes(proto.compression, proto.dtype, list(proto.size), numel)
    if len(proto.buffer) not in allowed:
        raise BadRequest(
            f"{len(proto.buffer)} bytes do not hold a {proto.dtype} tensor of shape {tuple(proto.size)} "
            f"with compression {_compression_name(proto.compression)}"
        )


# Petals peers send NONE unless a server's schema asks for another compression (ours never does).
# Of the others only hivemind's 16-bit ones are accepted: plain numpy decoders whose input size is
# checked here; the 8-bit ones run native kernels on peer-chosen sizes. They carry these dtypes.
_FLOAT16 = runtime_pb2.CompressionType.FLOAT16
_MEANSTD_16BIT = runtime_pb2.CompressionType.MEANSTD_16BIT
_FLOATING_DTYPES = ("float16", "float32", "float64")


def _allowed_buffer_sizes(compression: int, dtype: str, shape: list[int], numel: int) -> tuple[int, ...]:
    if compression not in (_NONE, _FLOAT16, _MEANSTD_16BIT):
        raise BadRequest(f"compression {_compression_name(compression)} is not accepted")
    if compression == _NONE and dtype in _PLAIN_DTYPES:
        return (numel * _PLAIN_DTYPES[dtype].itemsize,)
    if compression == _NONE and dtype == "bfloat16":
        # hivemind sends bfloat16 as float32 values (its legacy default) or as the raw 2-byte words;
        # it tells them apart by bytes per element, so an empty tensor has only the one form.
        return (numel * 4, numel * 2) if numel else (0,)
    if compression != _NONE and dtype in _FLOATING_DTYPES:
        if compression == _FLOAT16:
            return (numel * 2,)
        if shape:  # float16 values, then a float32 mean and std per row of the last dimension
            return (numel * 2 + 2 * 4 * math.prod(shape[:-1]),)
    raise BadRequest(f"a {dtype[:32]!r} tensor with compression {_compression_name(compression)} is not accepted")


def _compression_name(compression: int) -> str:
    if compression in runtime_pb2.CompressionType.values():
        return runtime_pb2.CompressionType.Name(compression)
    return str(compression)


def deserialize_streamed(parts: list[runtime_pb2.Tensor]) -> list[torch.Tensor]:
    """Tensors sent in chunks (hivemind's split_for_streaming): each tensor's first chunk counts them."""
    tensors, i = [], 0
    while i < len(parts):
        count = max(parts[i].chunks, 1)
        try:
            tensors.append(_deserialize_one(combine_from_streaming(parts[i : i + count])))
        except BadRequest as e:
            raise BadRequest(f"streamed tensor {len(tensors)} cannot be reassembled: {e}") from None
        except Exception as e:
            raise BadRequest(f"streamed tensor {len(tensors)} cannot be reassembled ({type(e).__name__})") from None
        i += count
    return tensors


def pack_args(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], Any]:
    """Petals' args_structure for positional tensor arguments: ([b"__T0", b"__T1", ...], {})."""
    return tensors, [[TENSOR_MARK + str(i).encode() for i in range(len(tensors))], {}]


def unpack_args(tensors: list[torch.Tensor], args_structure: Any) -> list[torch.Tensor | None]:
    """Positional arguments of a request: the flat tensor list, or as its args_structure orders them."""
    if args_structure is None:
        return list(tensors)
    if (
        not isinstance(args_structure, (list, tuple))
        or len(args_structure) != 2
        or not isinstance(args_structure[0], (list, tuple))
        or len(args_structure[0]) > MAX_STRUCTURE_ITEMS
    ):
        raise BadRequest("args_structure must be [positional args, kwargs]")
    args: list[torch.Tensor | None] = []
    for item in args_structure[0]:
        if isinstance(item, bytes) and item.startswith(TENSOR_MARK):
            index_text = item[len(TENSOR_MARK) :]
            if not index_text.isdigit() or int(index_text) >= len(tensors):
                raise BadRequest(f"args_structure refers to a missing tensor {item[:20]!r}")
            args.append(tensors[int(index_text)])
        elif item is None:
            args.append(None)
        else:
            raise BadRequest("args_structure may only hold tensor references and None")
    return args


def expert_request(uid: str, tensors: list[torch.Tensor], metadata: dict[str, Any]) -> runtime_pb2.ExpertRequest:
    return runtime_pb2.ExpertRequest(
        uid=uid, tensors=[serialize(t) for t in tensors], metadata=dumps_metadata(metadata)
    )
