"""Runs a server's span of transformer blocks: full-sequence forward, backward, and cached inference.

The blocks are the architecture's own transformers decoder layers; the model family
(`swarm.models`) says how to call them. For cached inference each session owns a
`SessionKVCache` that transformers' attention writes into through the same `update()` call it
uses with its own caches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig

from swarm.checkpoint import CheckpointFiles, LoadedWeights, PageReleaser, trim_heap
from swarm.models.family import BlockInputs, CacheLayout, ModelFamily, call_decoder_layer
from swarm.server.activations import KeptForward
from swarm.server.adapters import LoraHook, LoraWeights, attach_adapter, using_adapter
from swarm.server.attention_masks import attention_mask, needs_mask, stacked_attention_mask
from swarm.server.quantization import quantize_block
from swarm.server.session_attention import ATTENTION_NAME, SessionParts


def span_cache_layout(family: ModelFamily, config: PretrainedConfig, start: int, end: int) -> CacheLayout:
    """The one cache layout of blocks [start, end); a span whose layers differ is refused."""
    layouts = {family.cache_layout(config, index) for index in range(start, end)}
    if len(layouts) != 1:
        raise ValueError(f"blocks {start}:{end} have different cache layouts; serve them as separate spans")
    return layouts.pop()


def kv_cache_bytes(layout: CacheLayout, num_blocks: int, batch_size: int, max_length: int, dtype: torch.dtype) -> int:
    element = torch.finfo(dtype).bits // 8
    return num_blocks * batch_size * max_length * layout.bytes_per_token(element)


class SessionKVCache:
    """Preallocated keys/values for a run of consecutive blocks of one inference session."""

    def __init__(
        self,
        first_block: int,
        num_blocks: int,
        batch_size: int,
        max_length: int,
        layout: CacheLayout,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.first_block = first_block
        self.num_blocks = num_blocks
        self.batch_size = batch_size
        self.max_length = max_length
        key_shape = (num_blocks, batch_size, layout.key_heads, max_length, layout.key_dim)
        value_shape = (num_blocks, batch_size, layout.value_heads, max_length, layout.value_dim)
        self.keys = torch.zeros(key_shape, dtype=dtype, device=device)
        self.values = torch.zeros(value_shape, dtype=dtype, device=device)
        self.position = 0  # tokens already stored; the next step writes from here

    # Called by transformers' attention with the layer's global index.
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        slot = layer_idx - self.first_block
        end = self.position + key_states.shape[2]
        self.keys[slot, :, :, self.position : end] = key_states
        self.values[slot, :, :, self.position : end] = value_states
        return self.keys[slot, :, :, :end], self.values[slot, :, :, :end]

    def reorder(self, hypo_ids: torch.Tensor) -> None:
        """Beam search: row i of the batch continues hypothesis hypo_ids[i]."""
        self.keys[:, :, :, : self.position] = self.keys[:, hypo_ids, :, : self.position]
        self.values[:, :, :, : self.position] = self.values[:, hypo_ids, :, : self.position]


class StackedCaches:
    """The caches of sessions stepping together, behind the one `update()` that attention calls.

    Each session's rows write their new keys and values into its own cache at its own position.
    With `per_session` (families that call transformers' attention interface), attention gets each
    session's own cache views and attends session by session (`swarm.server.session_attention`):
    nothing is copied. Otherwise it gets every row's cached keys and values padded on the right to
    `kv_length`: the padded tensors are allocated once per step and refilled layer after layer; each
    row's length is the same in every layer, so its padding stays zero (finite, and masked out).
    """

    def __init__(self, caches: list[SessionKVCache], kv_length: int, per_session: bool = False):
        self.caches = caches
        self.kv_length = kv_length
        self.per_session = per_session
        self._padded: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.per_session:
            return self._update_sessions(key_states, value_states, layer_idx)
        if self._padded is None:
            rows, key_heads, _, key_dim = key_states.shape
            _, value_heads, _, value_dim = value_states.shape
            self._padded = (
                key_states.new_zeros(rows, key_heads, self.kv_length, key_dim),
                value_states.new_zeros(rows, value_heads, self.kv_length, value_dim),
            )
        keys, values = self._padded
        row = 0
        for cache in self.caches:
            end_row = row + cache.batch_size
            session_keys, session_values = cache.update(key_states[row:end_row], value_states[row:end_row], layer_idx)
            keys[row:end_row, :, : session_keys.shape[2]] = session_keys
            values[row:end_row, :, : session_values.shape[2]] = session_values
            row = end_row
        return keys, values

    def _update_sessions(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int
    ) -> tuple[SessionParts, SessionParts]:
        rows = [cache.batch_size for cache in self.caches]
        keys, values, row = [], [], 0
        for cache, count in zip(self.caches, rows):
            session_keys, session_values = cache.update(
                key_states[row : row + count], value_states[row : row + count], layer_idx
            )
            keys.append(session_keys)
            values.append(session_values)
            row += count
        return SessionParts(keys, rows), SessionParts(values, rows)


@dataclasses.dataclass
class QueuedStep:
    """One session's inference step, as the step batcher hands it to the backend."""

    hidden: torch.Tensor
    cache: SessionKVCache
    prompts: torch.Tensor | None = None
    hypo_ids: torch.Tensor | None = None


class SpanBackend:
    """The blocks [start, end) of one model, on one device, in one dtype."""

    def __init__(
        self,
        family: ModelFamily,
        config: PretrainedConfig,
        start: int,
        end: int,
        block_weights: Iterable[dict[str, torch.Tensor]],
        dtype: torch.dtype,
        device: torch.device,
        quant_type: str = "none",
    ):
        """The i-th of `block_weights` holds block start + i's tensors, named as in the checkpoint without the block
        prefix. A generator (`CheckpointFiles.load_blocks`) is taken one block at a time: each block is built,
        quantized and moved before the next one is read."""
        self.family, self.config = family, config
        self.start, self.end = start, end
        self.dtype, self.device = dtype, device
        self.hidden_size: int = config.hidden_size  # read on every request; config attributes are slow
        self.cache_layout = span_cache_layout(family, config, start, end)
        # What stacked_step_bytes needs, read once (the batcher asks for every queued step): bytes per element,
        # attention heads, activation width per token, cached bytes per token of one layer.
        element = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
        self._step_shape = (
            element,
            getattr(config, "num_attention_heads", 1) or 1,
            self.hidden_size + (getattr(config, "intermediate_size", None) or 4 * self.hidden_size),
            self.cache_layout.bytes_per_token(element),
        )
        self.attention = [family.layer_attention(config, index) for index in range(start, end)]
        self._additive_masks = family.attn_implementation(config) == "eager"
        # Stacked sessions attend each over its own cache where the layers call transformers' attention interface.
        self.per_session_attention = (
            family.call_block is call_decoder_layer
            and family.cache_to_attention
            and getattr(config, "_attn_implementation", None) == "sdpa"
        )
        if self.per_session_attention:
            config._attn_implementation = ATTENTION_NAME  # plain SDPA for everything but stacked sessions
        if getattr(config, "_experts_implementation", None) is None:
            config._experts_implementation = "grouped_mm"  # MoE layers: what transformers picks for whole models
        self.blocks = nn.ModuleList()
        weights = iter(block_weights)
        for index in range(start, end):
            # Passed on, not bound here: the block's float tensors die as soon as it is built and converted.
            self.blocks.append(self._build_block(index, next(weights, None), quant_type))
        if next(weights, None) is not None:
            raise ValueError(f"more block weights than the {end - start} blocks {start}:{end}")
        self.rotary = family.make_rotary(config).to(device) if family.make_rotary else None
        self._rope_follows_length = _rope_follows_length(self.rotary)
        self.adapters: list[str] = []  # served LoRA adapters, by name
        self._lora_hooks: dict[tuple[int, str], LoraHook] = {}

    def _build_block(self, index: int, weights: dict[str, torch.Tensor] | None, quant_type: str) -> nn.Module:
        if weights is None:
            raise ValueError(f"no weights for block {index} of blocks {self.start}:{self.end}")
        # Tensors straight from the loader are nobody else's: their mapped pages can go once quantized.
        release = PageReleaser() if isinstance(weights, LoadedWeights) else None
        state = self.family.convert_block_weights(weights, self.config)
        del weights
        with torch.device("meta"):
            block = self.family.make_block(self.config, index)
        block.load_state_dict(state, strict=True, assign=True)
        del state  # the block holds the tensors now: quantizing a layer frees its float weight
        block = quantize_block(block, quant_type, self.dtype, self.device, release)
        return block.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)

    def add_adapter(self, name: str, loras: dict[tuple[int, str], LoraWeights]) -> None:
        """Serve LoRA adapter `name` (weights by block index and layer path); the base weights stay as they are."""
        attach_adapter(name, self.blocks, self.start, self._lora_hooks, loras)
        self.adapters.append(name)

    def cache_bytes(self, num_blocks: int, batch_size: int, max_length: int) -> int:
        return kv_cache_bytes(self.cache_layout, num_blocks, batch_size, max_length, self.dtype)

    def stacked_step_bytes(self, rows: int, length: int, kv_length: int) -> int:
        """Roughly the temporary bytes of one stacked step: one layer's attention scores and masks (with padded
        copies, every row's cache padded to `kv_length`, refilled layer after layer) and MLP activations."""
        element, heads, width, kv_bytes = self._step_shape
        scores = (heads + 1) * length * kv_length * element  # one row's scores and mask
        # Sessions attending each over its own cache do so one after another; padded copies are made for all rows.
        attention = scores if self.per_session_attention else rows * (kv_length * kv_bytes + scores)
        return attention + rows * length * width * element

    def new_cache(self, first_block: int, num_blocks: int, batch_size: int, max_length: int) -> SessionKVCache:
        return SessionKVCache(
            first_block, num_blocks, batch_size, max_length, self.cache_layout, self.dtype, self.device
        )

    def _run(
        self,
        hidden: torch.Tensor,
        first: int,
        last: int,
        offset: int,
        prompts: torch.Tensor | None,
        cache: SessionKVCache | StackedCaches | None,
        adapter: str | None = None,
        row_offsets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        with using_adapter(adapter):  # read by the adapted layers' hooks, on this thread only
            return self._run_blocks(hidden, first, last, offset, prompts, cache, row_offsets)

    def _run_blocks(
        self,
        hidden: torch.Tensor,
        first: int,
        last: int,
        offset: int,
        prompts: torch.Tensor | None,
        cache: SessionKVCache | StackedCaches | None,
        row_offsets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Blocks [first, last) on `length` new tokens per row after `offset` cached ones.

        `row_offsets` instead gives each row its own number of cached tokens (sessions stepping
        together): positions, masks and ALiBi then follow each row's own prefix.
        """
        family = self.family
        batch, length, _ = hidden.shape
        new_tokens = torch.arange(length, device=self.device)
        if row_offsets is None:
            positions = (new_tokens + offset).unsqueeze(0).expand(batch, -1)
            kv_length = offset + length
        else:
            positions = row_offsets[:, None] + new_tokens
            kv_length = int(row_offsets.max()) + length
        alibi = None
        if family.make_alibi is not None:  # biases by absolute key position: rows padded on the right share them
            alibi = family.make_alibi(self.config, batch, kv_length, hidden.dtype, self.device)
        masks: dict[int | None, torch.Tensor | None] = {}  # by sliding window, built once per step
        position_embeddings: dict[str, object] = {}  # by rope kind
        for i in range(first - self.start, last - self.start):
            attention = self.attention[i]
            window = attention.sliding_window
            if window not in masks:
                if isinstance(cache, StackedCaches) and cache.per_session:  # each session's own mask
                    parts = [self._mask(c.position, length, window, None, hidden.dtype) for c in cache.caches]
                    masks[window] = SessionParts(parts, [c.batch_size for c in cache.caches])
                else:
                    masks[window] = self._mask(offset, length, window, row_offsets, hidden.dtype)
            if attention.rope not in position_embeddings:
                position_embeddings[attention.rope] = self._position_embeddings(
                    hidden, positions, attention.rope, per_row=row_offsets is not None
                )
            if prompts is not None:
                hidden = _add_prompt(hidden, prompts[i - (first - self.start)])
            inputs = BlockInputs(masks[window], positions, position_embeddings[attention.rope], alibi, cache)
            hidden = self.family.call_block(self.blocks[i], hidden, inputs)
        return hidden

    def _position_embeddings(self, hidden: torch.Tensor, positions: torch.Tensor, rope: str, per_row: bool) -> object:
        if self.rotary is None:
            return None
        if not (per_row and self._rope_follows_length):
            return self.family.rotary_for(self.rotary, hidden, positions, rope)
        # Dynamic and long RoPE pick their frequencies from the longest position they are given: rows of
        # sessions stepping together each get what their session alone would.
        rows = [
            self.family.rotary_for(self.rotary, hidden[i : i + 1], positions[i : i + 1], rope)
            for i in range(len(positions))
        ]
        if isinstance(rows[0], torch.Tensor):
            return torch.cat(rows)
        return tuple(torch.cat(parts) for parts in zip(*rows))

    def _mask(
        self, offset: int, length: int, window: int | None, row_offsets: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor | None:
        options = {"additive": self._additive_masks, "dtype": dtype, "device": self.device}
        if row_offsets is not None:  # rows of different lengths: always masked (the padding)
            return stacked_attention_mask(row_offsets, length, window, **options)
        if not needs_mask(offset, length, window, additive=self._additive_masks, always=self.family.always_mask):
            return None
        return attention_mask(offset, length, window, **options)

    @torch.inference_mode()
    def forward(
        self,
        hidden: torch.Tensor,
        first: int,
        last: int,
        prompts: torch.Tensor | None = None,
        adapter: str | None = None,
    ) -> torch.Tensor:
        return self._run(hidden.to(self.device, self.dtype), first, last, 0, _cast(prompts, self), None, adapter)

    @torch.inference_mode()
    def inference_step(
        self,
        hidden: torch.Tensor,
        cache: SessionKVCache,
        prompts: torch.Tensor | None = None,
        hypo_ids: torch.Tensor | None = None,
        adapter: str | None = None,
    ) -> torch.Tensor:
        if hypo_ids is not None:
            cache.reorder(hypo_ids.to(self.device))
        first = cache.first_block
        last = first + cache.num_blocks
        hidden = hidden.to(self.device, self.dtype)
        if cache.position > 0:
            prompts = None  # deep prompts apply to the leading tokens, which the first step carried
        output = self._run(hidden, first, last, cache.position, _cast(prompts, self), cache, adapter)
        cache.position += hidden.shape[1]
        return output

    @torch.inference_mode()
    def inference_steps(self, steps: list[QueuedStep], adapter: str | None = None) -> list[torch.Tensor]:
        """One step of each of several sessions, computed as one batch; each gets what it would alone.

        The sessions share blocks, adapter and new tokens per row (and carry no deep prompts); each
        keeps its own cache and position. Rows are stacked; attention reads each session's cache
        padded on the right to the longest, with the padding masked.
        """
        if len(steps) == 1:
            step = steps[0]
            hypo_ids, step.hypo_ids = step.hypo_ids, None  # applied once, even if this step is computed again
            return [self.inference_step(step.hidden, step.cache, step.prompts, hypo_ids, adapter)]
        caches = [step.cache for step in steps]
        for step in steps:
            if step.prompts is not None and step.cache.position == 0:
                raise ValueError("a session's first step with deep prompts is computed alone")
        for step in steps:
            if step.hypo_ids is not None:
                # Once: if this batch fails, the batcher computes each step again alone, on reordered caches.
                step.cache.reorder(step.hypo_ids.to(self.device))
                step.hypo_ids = None
        length = steps[0].hidden.shape[1]
        first = caches[0].first_block
        if any(c.first_block != first or c.num_blocks != caches[0].num_blocks for c in caches):
            raise ValueError("sessions stepping together must cover the same blocks")
        hidden = torch.cat([step.hidden.to(self.device, self.dtype) for step in steps])
        row_offsets = torch.tensor(
            [cache.position for cache in caches for _ in range(cache.batch_size)], device=self.device
        )
        stacked = StackedCaches(caches, int(row_offsets.max()) + length, self.per_session_attention)
        output = self._run(hidden, first, first + caches[0].num_blocks, 0, None, stacked, adapter, row_offsets)
        for cache in caches:
            cache.position += length
        return list(output.split([cache.batch_size for cache in caches]))

    def backward(
        self,
        hidden: torch.Tensor,
        grad_outputs: torch.Tensor,
        first: int,
        last: int,
        prompts: torch.Tensor | None = None,
        adapter: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gradients of the span's output w.r.t. its input hidden states (and deep prompts)."""
        return self.backward_from(self.forward_for_backward(hidden, first, last, prompts, adapter), grad_outputs)

    def forward_for_backward(
        self,
        hidden: torch.Tensor,
        first: int,
        last: int,
        prompts: torch.Tensor | None = None,
        adapter: str | None = None,
    ) -> KeptForward:
        """A forward pass that keeps its autograd graph (and says how many bytes that graph holds)."""
        saved: dict[int, int] = {}  # storage address -> bytes: activations autograd keeps for the backward

        def count(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.requires_grad:  # not the frozen weights it also keeps (they are held anyway)
                storage = tensor.untyped_storage()
                saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
            hidden = hidden.to(self.device, self.dtype).detach().requires_grad_(True)
            prompts = _cast(prompts, self)
            if prompts is not None:
                prompts = prompts.detach().requires_grad_(True)
            output = self._run(hidden, first, last, 0, prompts, None, adapter)
        return KeptForward(first, last, hidden, prompts, output, adapter, nbytes=sum(saved.values()))

    def backward_from(self, kept: KeptForward, grad_outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        inputs = [kept.hidden] if kept.prompts is None else [kept.hidden, kept.prompts]
        grads = torch.autograd.grad(kept.output, inputs, grad_outputs.to(self.device, self.dtype))
        return grads[0], (grads[1] if kept.prompts is not None else None)


def load_span(
    files: CheckpointFiles,
    family: ModelFamily,
    config: PretrainedConfig,
    start: int,
    end: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    progress: bool = False,
    quant_type: str = "none",
) -> SpanBackend:
    """Read only blocks [start, end) from a checkpoint (only the shards that hold them) and build their backend."""
    names = family.checkpoint.resolve(files.tensor_names())
    prefixes = [names.block_prefix(index) for index in range(start, end)]
    # One block at a time: read (cast chunk by chunk), built, quantized, moved, then the next one.
    blocks = files.load_blocks(prefixes, dtype=dtype, progress=progress, description=f"Loading blocks {start}:{end}")
    backend = SpanBackend(family, config, start, end, blocks, dtype, device, quant_type)
    trim_heap()  # what the conversions freed goes back to the system, not only to this process's heap
    return backend


def _rope_follows_length(rotary: nn.Module | None) -> bool:
    """Whether a rotary module's frequencies depend on the longest position it is called with."""
    kinds = getattr(rotary, "rope_type", None)
    kinds = kinds.values() if isinstance(kinds, dict) else [kinds]
    return any(isinstance(kind, str) and ("dynamic" in kind or kind == "longrope") for kind in kinds)


def _add_prompt(hidden: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    length = min(prompt.shape[1], hidden.shape[1])
    return torch.cat([hidden[:, :length] + prompt[:, :length], hidden[:, length:]], dim=1)


def _cast(tensor: torch.Tensor | None, backend: SpanBackend) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(backend.device, backend.dtype)
