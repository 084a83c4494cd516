"""Served LoRA adapters (Petals' `--adapters`): each request may pick one by name, or none.

An adapter is what `PeftModel.save_pretrained` writes (`adapter_config.json` and
`adapter_model.safetensors`), in a local folder or a Hub repository; its name is the path or
repository string as given. A server reads only the LoRA tensors of its own blocks and leaves the
base weights untouched: each adapted `nn.Linear` gets a forward hook that adds
`lora_B(lora_A(x)) * scaling` when the adapter active on the calling thread (`using_adapter`) has
weights for that layer. With no adapter active the hook returns nothing, so the output is exactly
the base layer's.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from swarm.checkpoint import is_local_checkpoint
from swarm.models.family import CheckpointNames

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # what PeftModel puts before the wrapped model's own names
LORA_TENSOR = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_B\.bias)$")

# The adapter of the request being computed on this thread (None: the base model).
_active_adapter: contextvars.ContextVar[str | None] = contextvars.ContextVar("active_adapter", default=None)


class AdapterError(ValueError):
    """An adapter that cannot be served: missing, not LoRA, or not fitting the model."""


@contextlib.contextmanager
def using_adapter(name: str | None) -> Iterator[None]:
    """Run the blocks with adapter `name` (None: without any) for the duration of the block."""
    token = _active_adapter.set(name)
    try:
        yield
    finally:
        _active_adapter.reset(token)


# ----- finding and reading an adapter -----


def adapter_folder(source: str, *, revision: str | None = None, token: str | None = None) -> Path:
    """The local folder holding adapter `source`: the folder itself, or a Hub repository's download."""
    if Path(source).is_dir():
        folder = Path(source)
    elif is_local_checkpoint(source):
        raise AdapterError(f"adapter {source!r}: no such folder")
    else:
        from huggingface_hub import snapshot_download

        try:
            folder = Path(
                snapshot_download(source, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE], revision=revision, token=token)
            )
        except Exception as e:
            raise AdapterError(f"adapter {source!r}: not a local folder, and the Hub download failed: {e}") from e
    for filename in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / filename).is_file():
            raise AdapterError(
                f"adapter {source!r} has no {filename} (expected what PeftModel.save_pretrained writes; "
                f"only safetensors weights are read)"
            )
    return folder


def read_lora_config(source: str, folder: Path) -> Any:
    """The adapter's peft `LoraConfig`, refused unless it is plain LoRA on linear layers."""
    from peft import LoraConfig, PeftConfig

    try:
        config = PeftConfig.from_pretrained(str(folder))
    except Exception as e:
        raise AdapterError(f"adapter {source!r}: unreadable {CONFIG_FILE}: {e}") from e
    if not isinstance(config, LoraConfig):
        raise AdapterError(f"adapter {source!r} is a {config.peft_type} adapter; only LoRA adapters can be served")
    variants = [
        field.name
        for field in dataclasses.fields(config)
        if field.metadata.get("is_lora_variant") and getattr(config, field.name)
    ]
    if isinstance(config.init_lora_weights, str) and config.init_lora_weights in _init_variants():
        variants.append(f"init_lora_weights={config.init_lora_weights}")
    if config.target_parameters:
        variants.append("target_parameters")
    if config.layer_replication:
        variants.append("layer_replication")
    if variants:
        raise AdapterError(f"adapter {source!r} uses {', '.join(variants)}; only plain LoRA can be served")
    return config


def _init_variants() -> list[str]:
    from peft import LoraConfig

    field = next(f for f in dataclasses.fields(LoraConfig) if f.name == "init_lora_weights")
    return list(field.metadata.get("lora_variants", ()))


# ----- LoRA tensors of the served blocks -----


@dataclasses.dataclass(frozen=True)
class LoraTensorName:
    block: int
    module: str  # the linear layer's path inside the block, e.g. "self_attn.q_proj"
    kind: str | None  # lora_A.weight, lora_B.weight, lora_B.bias; None: not a LoRA tensor
    key: str  # the layer's name in the whole model (what peft's rank_pattern/alpha_pattern match)


def parse_lora_tensor_name(name: str, names: CheckpointNames) -> LoraTensorName | None:
    """Where one saved adapter tensor belongs: its block and layer; None for tensors outside the blocks.

    peft names a tensor `base_model.model.<the model's module path>.lora_A.weight`; the block part
    of that path is the family's checkpoint naming (`model.layers.3.` for Llama) or, for an adapter
    trained on the bare base model, the same without the base prefix.
    """
    path = name.removeprefix(PEFT_PREFIX)
    for base in sorted({*names.base_prefixes, ""}, key=len, reverse=True):
        prefix = base + names.blocks
        if not path.startswith(prefix):
            continue
        index, dot, inner = path[len(prefix) :].partition(".")
        if not (index.isdigit() and dot and inner):
            continue
        match = LORA_TENSOR.match(inner)
        if match is None:
            return LoraTensorName(int(index), inner, None, path)
        return LoraTensorName(int(index), match["module"], match["kind"], path[: -len(match["kind"]) - 1])
    return None


def _pattern_value(patterns: dict[str, Any], key: str, default: Any) -> Any:
    """peft's rank_pattern / alpha_pattern lookup: the first pattern matching the end of the layer's name."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def lora_scaling(config: Any, key: str) -> tuple[int, float]:
    """(rank, scaling) of one layer: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
    rank = _pattern_value(config.rank_pattern or {}, key, config.r)
    alpha = _pattern_value(config.alpha_pattern or {}, key, config.lora_alpha)
    return rank, alpha / math.sqrt(rank) if config.use_rslora else alpha / rank


@dataclasses.dataclass
class LoraWeights:
    """One layer's LoRA: output += (x @ lora_A.T @ lora_B.T + lora_B_bias) * scaling."""

    lora_A: torch.Tensor  # (rank, in_features)
    lora_B: torch.Tensor  # (out_features, rank)
    lora_B_bias: torch.Tensor | None
    scaling: float

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.lora_A.dtype)
        return nn.functional.linear(nn.functional.linear(x, self.lora_A), self.lora_B, self.lora_B_bias) * self.scaling


class LoraHook:
    """The forward hook on one adapted linear layer, holding that layer's weights of every adapter."""

    def __init__(self) -> None:
        self.adapters: dict[str, LoraWeights] = {}

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        name = _active_adapter.get()
        if name is None:
            return None  # the base layer's output, untouched
        lora = self.adapters.get(name)
        if lora is None:
            return None  # this adapter does not touch this layer
        return (output + lora.delta(args[0])).to(output.dtype)  # as peft: summed in the LoRA's dtype


def load_block_loras(
    source: str,
    folder: Path,
    config: Any,
    names: CheckpointNames,
    start: int,
    end: int,
    dtype: torch.dtype,
    device: torch.device,
) -> dict[tuple[int, str], LoraWeights]:
    """The adapter's LoRA weights of blocks [start, end), by (block index, layer path inside the block).

    Like peft (`autocast_adapter_dtype`), LoRA weights stay in float32 next to float16/bfloat16 blocks.
    """
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    keys: dict[tuple[int, str], str] = {}
    with safe_open(str(folder / WEIGHTS_FILE), framework="pt", device="cpu") as f:
        for tensor_name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            parsed = parse_lora_tensor_name(tensor_name, names)
            if parsed is None or not start <= parsed.block < end:
                continue
            if parsed.kind is None:
                raise AdapterError(
                    f"adapter {source!r}: {tensor_name} is not a LoRA tensor (trained base weights or "
                    f"modules_to_save inside the blocks cannot be served)"
                )
            where = (parsed.block, parsed.module)
            parts.setdefault(where, {})[parsed.kind] = f.get_tensor(tensor_name).to(device, dtype)
            keys[where] = parsed.key
    loras = {}
    for where, tensors in parts.items():
        if "lora_A.weight" not in tensors or "lora_B.weight" not in tensors:
            raise AdapterError(f"adapter {source!r}: {keys[where]} lacks its lora_A or lora_B weight")
        lora_A, lora_B = tensors["lora_A.weight"], tensors["lora_B.weight"]
        rank, scaling = lora_scaling(config, keys[where])
        if lora_A.ndim != 2 or lora_B.ndim != 2 or lora_A.shape[0] != rank or lora_B.shape[1] != rank:
            raise AdapterError(
                f"adapter {source!r}: {keys[where]} has lora_A {tuple(lora_A.shape)} and lora_B "
                f"{tuple(lora_B.shape)}, not rank {rank} as its config says"
            )
        loras[where] = LoraWeights(lora_A, lora_B, tensors.get("lora_B.bias"), scaling)
    return loras


def attach_adapter(
    source: str, blocks: nn.ModuleList, start: int, hooks: dict[tuple[int, str], LoraHook], loras: dict
) -> None:
    """Add one adapter's weights to a span's blocks, hooking each adapted layer once for all adapters."""
    for (index, module_path), lora in loras.items():
        try:
            layer = blocks[index - start].get_submodule(module_path)
        except AttributeError:
            layer = None
        if not isinstance(layer, nn.Linear):
            raise AdapterError(f"adapter {source!r}: block {index} has no linear layer {module_path!r} to adapt")
        if lora.lora_A.shape[1] != layer.in_features or lora.lora_B.shape[0] != layer.out_features:
            raise AdapterError(
                f"adapter {source!r}: block {index} {module_path} is {layer.in_features}->{layer.out_features}, "
                f"its LoRA is {lora.lora_A.shape[1]}->{lora.lora_B.shape[0]} (an adapter of another model?)"
            )
        if lora.lora_B_bias is not None and lora.lora_B_bias.shape != (layer.out_features,):
            raise AdapterError(f"adapter {source!r}: block {index} {module_path} has a lora_B bias of the wrong size")
    for (index, module_path), lora in loras.items():
        hook = hooks.get((index, module_path))
        if hook is None:
            hook = hooks[index, module_path] = LoraHook()
            blocks[index - start].get_submodule(module_path).register_forward_hook(hook)
        hook.adapters[source] = lora
