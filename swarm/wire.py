"""Turning RPC messages into validated tensors and metadata, and back (PROTOCOL.md, "RPC").

Everything here treats its input as hostile: bounded sizes, checked types, and a
`BadRequest` with a readable message instead of an obscure exception.
"""

from __future__ import annotations

from typing import Any

import msgpack
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer
from hivemind.utils.streaming import combine_from_streaming

MAX_METADATA_BYTES = 64 * 1024
MAX_STRUCTURE_ITEMS = 64
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
        metadata = msgpack.loads(raw, ext_hook=_known_ext_types_only, raw=False)
    except BadRequest:
        raise
    except Exception as e:
        raise BadRequest(f"metadata is not valid msgpack ({type(e).__name__})") from None
    if not isinstance(metadata, dict):
        raise BadRequest("metadata must be a msgpack dict")
    return metadata


def _known_ext_types_only(code: int, data: bytes) -> Any:
    # hivemind's own hook logs a warning per unknown type, which a hostile peer could use to flood logs.
    if code not in MSGPackSerializer._ext_type_codes and code != MSGPackSerializer._TUPLE_EXT_TYPE_CODE:
        raise BadRequest(f"metadata uses an unknown msgpack extension type {code}")
    return MSGPackSerializer._decode_ext_types(code, data)


# Uncompressed tensors of these types are (de)serialized here, without hivemind's per-tensor
# descriptors: the same bytes, a fraction of the time on every inference step. Everything else
# (bfloat16 and its legacy float32 encoding, compressed tensors) goes through hivemind.
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
        except Exception as e:
            raise BadRequest(f"tensor {i} cannot be deserialized ({type(e).__name__})") from None
    return result


def _deserialize_one(proto: runtime_pb2.Tensor) -> torch.Tensor:
    dtype = _PLAIN_DTYPES.get(proto.dtype) if proto.compression == _NONE else None
    if dtype is None:
        return deserialize_torch_tensor(proto)
    shape = torch.Size(proto.size)
    if len(proto.buffer) != shape.numel() * dtype.itemsize:
        raise ValueError(f"{len(proto.buffer)} bytes do not hold a {proto.dtype} tensor of shape {tuple(shape)}")
    if not proto.buffer:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(proto.buffer), dtype=dtype).reshape(shape)


def deserialize_streamed(parts: list[runtime_pb2.Tensor]) -> list[torch.Tensor]:
    """Tensors sent in chunks (hivemind's split_for_streaming): each tensor's first chunk counts them."""
    tensors, i = [], 0
    while i < len(parts):
        count = max(parts[i].chunks, 1)
        try:
            tensors.append(deserialize_torch_tensor(combine_from_streaming(parts[i : i + count])))
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
