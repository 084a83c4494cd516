"""Quantized blocks (`--quant-type`): a block's linear layers become bitsandbytes int8 or nf4 layers.

Names as Petals' QuantType: `none`, `int8` (LLM.int8(), outlier threshold 6.0) and `nf4` (QLoRA's
4-bit NormalFloat, blocks of 64 weights with double-quantized scales). Only `nn.Linear` layers inside
transformer blocks are converted; norms, rotary tables, MoE routers and MoE experts' fused weight
tensors (plain parameters, not `nn.Linear`) stay in the span's dtype. Embeddings and the LM head live
on clients and are never served.

bitsandbytes is imported only when a block is quantized, so `none` servers run without it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import nn
from transformers import PretrainedConfig

from swarm.checkpoint import trim_heap
from swarm.data_structures import QUANT_TYPES

logger = logging.getLogger(__name__)

INT8_THRESHOLD = 6.0  # LLM.int8()'s outlier threshold: activation columns above it are multiplied in 16 bit
NF4_BLOCKSIZE = 64  # weights per absmax scale
NF4_DOUBLE_QUANT_BLOCK = 256  # absmax scales per float32 second-level scale (bitsandbytes' nested statistics)
ROUTER_NAMES = ("gate", "router")  # MoE routers: tiny and precision-sensitive, kept in the span's dtype


class QuantizationError(ValueError):
    """The requested quantization cannot run here (bitsandbytes missing or unusable)."""


def resolve_quant_type(name: str, device: torch.device) -> str:
    """The quant type to serve with; fails fast (before joining the swarm) when bitsandbytes is missing.

    `auto` is Petals' default: nf4 on a GPU (3.9x more blocks than bfloat16 where memory is
    what limits a contributor), none on the CPU (float32 there; quantized matmuls are slower on CPUs
    and CPU servers are rarely short of memory). Without bitsandbytes, `auto` falls back to none.
    """
    if name not in ("auto", *QUANT_TYPES):
        raise ValueError(f"quant type must be auto or one of {', '.join(QUANT_TYPES)}, got {name!r}")
    quant_type = name if name != "auto" else ("nf4" if device.type == "cuda" else "none")
    if quant_type != "none":
        try:
            _bitsandbytes()
        except QuantizationError as e:
            if name != "auto":
                raise
            logger.warning("Serving unquantized blocks: %s", e)
            return "none"
    return quant_type


def _quiet(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    # The CPU backend tries an optional kernel from the Hugging Face Hub and warns when it is absent;
    # its own CPU kernels then run, which is what we want. LLM.int8() multiplies bfloat16 inputs in
    # float16 by design, and says so on every call.
    return "kernels-community" not in message and "will be cast from" not in message


def _bitsandbytes():
    for name in ("bitsandbytes.backends.cpu.ops", "bitsandbytes.autograd._functions"):
        if _quiet not in logging.getLogger(name).filters:
            logging.getLogger(name).addFilter(_quiet)
    try:
        import bitsandbytes
    except Exception as e:  # ImportError, or a broken native library
        raise QuantizationError(f"int8/nf4 quantization needs bitsandbytes (pip install bitsandbytes): {e}") from e
    return bitsandbytes


def _is_router(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ROUTER_NAMES


def _empty_layer(linear: nn.Linear, quant_type: str, dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes layer of `linear`'s shape on the meta device (no throwaway float weights)."""
    bnb = _bitsandbytes()
    with torch.device("meta"):
        if quant_type == "int8":
            layer = bnb.nn.Linear8bitLt(
                linear.in_features,
                linear.out_features,
                linear.bias is not None,
                has_fp16_weights=False,
                threshold=INT8_THRESHOLD,
            )
        else:
            layer = bnb.nn.Linear4bit(
                linear.in_features,
                linear.out_features,
                linear.bias is not None,
                compute_dtype=dtype,
                compress_statistics=True,
                quant_type="nf4",
            )
        # On AVX512-BF16 CPUs bitsandbytes repacks the weights at the first inference call into a layout
        # whose matmul has no autograd: a later backward (rpc_backward) would then fail or get wrong
        # gradients (bitsandbytes 0.50.2). The standard layout serves both.
        layer.support_avx512bf16_for_cpu = False
    return layer


def _with_bias(layer: nn.Module, linear: nn.Linear, dtype: torch.dtype) -> nn.Module:
    bias = linear.bias
    layer.bias = None if bias is None else nn.Parameter(bias.data.to(dtype), requires_grad=False)
    return layer.train(linear.training)  # int8 decomposes outliers differently in training mode


def _quantized_linear(linear: nn.Linear, quant_type: str, dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes layer holding `linear`'s float weights; they are quantized when it moves to a device."""
    bnb = _bitsandbytes()
    weight = linear.weight.data.to(dtype)
    layer = _empty_layer(linear, quant_type, dtype)
    if quant_type == "int8":
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, blocksize=NF4_BLOCKSIZE, compress_statistics=True, quant_type="nf4"
        )
    return _with_bias(layer, linear, dtype)


QUANTIZE_CHUNK_BYTES = 4 * 2**20  # float weight bytes quantized at a time (quantize_block with a device)


def _row_chunks(weight: torch.Tensor, multiple_of: int) -> list[tuple[int, int]]:
    """Row ranges of about QUANTIZE_CHUNK_BYTES each; each range's element count is a multiple of `multiple_of`."""
    rows, row_elements = weight.shape[0], weight[0].numel() if weight.shape[0] else 1
    step = multiple_of // math.gcd(row_elements, multiple_of)  # rows whose elements fill whole blocks
    per_chunk = max(step, QUANTIZE_CHUNK_BYTES // max(row_elements * weight.element_size(), 1) // step * step)
    return [(first, min(first + per_chunk, rows)) for first in range(0, rows, per_chunk)]


def _int8_weight(weight: torch.Tensor, dtype: torch.dtype, device: torch.device, release) -> nn.Parameter:
    """LLM.int8()'s row-wise quantization, as Int8Params does when moved to a device, a few rows at a time."""
    bnb = _bitsandbytes()
    quantized, scales = None, None
    for first, end in _row_chunks(weight, 1):
        rows = weight[first:end]
        # The same casts as Int8Params: to the span's dtype (on the CPU), then float16 on the device.
        chunk, chunk_scales, _ = bnb.functional.int8_vectorwise_quant(rows.to(dtype).to(device, torch.float16))
        if quantized is None:
            quantized = torch.empty(weight.shape, dtype=chunk.dtype, device=device)
            scales = torch.empty(weight.shape[0], dtype=chunk_scales.dtype, device=device)
        quantized[first:end], scales[first:end] = chunk, chunk_scales
        release(rows)
    return bnb.nn.Int8Params(quantized, requires_grad=False, has_fp16_weights=False, CB=quantized, SCB=scales)


def _nf4_weight(weight: torch.Tensor, dtype: torch.dtype, device: torch.device, release) -> nn.Parameter:
    """QLoRA's NF4 with double-quantized scales, as Params4bit does when moved to a device, a few rows at a time.

    Each block of 64 weights is quantized alone, so chunks of whole blocks give the bytes of the whole tensor;
    the second-level quantization of the scales then runs once over all of them, as bitsandbytes does it.
    """
    bnb = _bitsandbytes()
    functional = bnb.functional
    count = weight.numel()
    packed = torch.empty(((count + 1) // 2, 1), dtype=torch.uint8, device=device)
    absmax = torch.empty(math.ceil(count / NF4_BLOCKSIZE), dtype=torch.float32, device=device)
    for first, end in _row_chunks(weight, NF4_BLOCKSIZE):
        rows = weight[first:end]
        chunk = rows.to(dtype).to(device).contiguous()
        start = first * (count // max(weight.shape[0], 1))  # elements before this chunk
        part, scales = torch.ops.bitsandbytes.quantize_4bit.default(chunk, NF4_BLOCKSIZE, "nf4", torch.uint8)
        packed[start // 2 : start // 2 + part.shape[0]] = part
        absmax[start // NF4_BLOCKSIZE : start // NF4_BLOCKSIZE + scales.numel()] = scales
        release(rows)
    offset = absmax.mean()
    scales, nested = functional.quantize_blockwise(absmax - offset, blocksize=NF4_DOUBLE_QUANT_BLOCK)
    state = functional.QuantState(
        absmax=scales,
        shape=weight.shape,
        dtype=dtype,
        blocksize=NF4_BLOCKSIZE,
        code=functional.get_4bit_type("nf4", device=device),
        quant_type="nf4",
        offset=offset,
        state2=nested,
    )
    return bnb.nn.Params4bit(
        packed,
        requires_grad=False,
        quant_state=state,
        blocksize=NF4_BLOCKSIZE,
        compress_statistics=True,
        quant_type="nf4",
        bnb_quantized=True,
    )


def _quantized_linear_now(linear: nn.Linear, quant_type: str, dtype: torch.dtype, device, release) -> nn.Module:
    """`linear` quantized on `device` right away, its float weight read a chunk of rows at a time."""
    layer = _empty_layer(linear, quant_type, dtype)
    weight = linear.weight.detach()
    quantize = _int8_weight if quant_type == "int8" else _nf4_weight
    layer.weight = quantize(weight, dtype, device, release)
    return _with_bias(layer, linear, dtype).to(device)


def quantize_block(
    block: nn.Module,
    quant_type: str,
    dtype: torch.dtype,
    device: torch.device | None = None,
    release: Callable[[torch.Tensor], None] | None = None,
) -> nn.Module:
    """Swap the block's `nn.Linear` layers (on the CPU, not yet moved) for int8/nf4 ones, in place.

    Without `device`, the weights are quantized by the block's next `.to(device)`, on that device. With it,
    each layer is quantized there at once, a chunk of rows at a time, and its float weight dropped before
    the next layer's is read; `release(rows)` is called with each chunk's source once it is converted (the
    loader's mapped pages can go then). `none` returns the block as it is.
    """
    if quant_type == "none":
        return block
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant type must be one of {', '.join(QUANT_TYPES)}, got {quant_type!r}")
    names = [  # names only: holding the modules would keep every float weight alive until the end
        name
        for name, module in block.named_modules()
        if type(module) is nn.Linear and not _is_router(name)  # exact type: already quantized layers are skipped
    ]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = block.get_submodule(parent_name) if parent_name else block
        linear = getattr(parent, child)
        if device is None:
            setattr(parent, child, _quantized_linear(linear, quant_type, dtype))
        else:
            setattr(parent, child, _quantized_linear_now(linear, quant_type, dtype, device, release or _keep))
            del linear
            trim_heap()  # the C heap keeps the chunks' freed temporaries otherwise: they would add up to a peak
    return block


def _keep(tensor: torch.Tensor) -> None:
    """The default `release`: the source stays as it is."""


def log_quantization(quant_type: str, blocks: nn.ModuleList) -> None:
    """Say what was quantized, and that MoE experts' fused tensors were not."""
    if quant_type == "none" or not len(blocks):
        return
    block = blocks[0]
    linears = [name for name, module in block.named_modules() if isinstance(module, nn.Linear)]
    quantized = [name for name, module in block.named_modules() if _is_quantized(module)]
    kept = [name for name, param in block.named_parameters() if param.ndim >= 2 and not _in_any(name, quantized)]
    logger.info(
        "Quantized %d of %d linear layers per block to %s; kept in float: %s",
        len(quantized),
        len(linears),
        quant_type,
        ", ".join(kept) if kept else "norms only",
    )


def _is_quantized(module: nn.Module) -> bool:
    return type(module).__module__.startswith("bitsandbytes")


def _in_any(param_name: str, modules: list[str]) -> bool:
    return any(param_name.startswith(module + ".") for module in modules)


# ----- memory -----


def quantized_linear_bytes(in_features: int, out_features: int, quant_type: str, dtype: torch.dtype) -> int:
    """Bytes of one linear layer's weight matrix (bias excluded) once quantized as bitsandbytes stores it."""
    count = in_features * out_features
    if quant_type == "none":
        return count * _element_bytes(dtype)
    if quant_type == "int8":
        return count + 4 * out_features  # int8 weights + a float32 scale per output row
    if quant_type == "nf4":
        blocks = math.ceil(count / NF4_BLOCKSIZE)
        nested = math.ceil(blocks / NF4_DOUBLE_QUANT_BLOCK)
        # two weights per byte; a uint8 absmax per block of 64; a float32 scale per 256 absmaxes,
        # plus the two 16-entry lookup tables and the absmax offset (float32).
        return math.ceil(count / 2) + blocks + 4 * nested + 4 * (16 + 256 + 1)
    raise ValueError(f"quant type must be one of {', '.join(QUANT_TYPES)}, got {quant_type!r}")


def block_bytes(config: PretrainedConfig, dtype: torch.dtype, quant_type: str) -> int:
    """Weight bytes of the model's largest block served with `quant_type` (from the config, no weights built)."""
    from swarm.models.registry import family_for  # the registry imports every family: only when needed

    family = family_for(config)
    largest = 0
    for index in sorted({0, family.num_blocks(config) - 1}):  # a model's blocks may differ (dense first layers)
        with torch.device("meta"):
            block = family.make_block(config, index)
        largest = max(largest, _planned_bytes(block, dtype, quant_type))
    return largest


def _planned_bytes(block: nn.Module, dtype: torch.dtype, quant_type: str) -> int:
    element = _element_bytes(dtype)
    total = 0
    weights = set()
    for name, module in block.named_modules():
        if type(module) is nn.Linear and not _is_router(name):
            total += quantized_linear_bytes(module.in_features, module.out_features, quant_type, dtype)
            weights.add(f"{name}.weight" if name else "weight")
    for name, param in block.named_parameters():
        if name not in weights:
            total += param.numel() * element
    return total


def measured_bytes(module: nn.Module) -> int:
    """Bytes a built module really holds: parameters, buffers and bitsandbytes' quantization states."""
    seen: dict[int, int] = {}

    def add(tensor: torch.Tensor | None) -> None:
        if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()

    for tensor in [*module.parameters(), *module.buffers()]:
        add(tensor)
        add(getattr(tensor, "SCB", None))  # int8 row scales before the first forward
        _add_quant_state(getattr(tensor, "quant_state", None), add)
    for sub in module.modules():
        state = getattr(sub, "state", None)  # Linear8bitLt's MatmulLtState after the first forward
        add(getattr(state, "CB", None))
        add(getattr(state, "SCB", None))
    return sum(seen.values())


def _add_quant_state(state, add) -> None:
    if state is None:
        return
    for field in ("absmax", "code", "offset"):
        add(getattr(state, field, None))
    _add_quant_state(getattr(state, "state2", None), add)


def _element_bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8
