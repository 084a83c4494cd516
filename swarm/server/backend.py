"""Runs a server's span of transformer blocks: full-sequence forward, backward, and cached inference.

The blocks are the architecture's own transformers decoder layers. For cached inference each
session owns a `SessionKVCache` that transformers' attention writes into through the same
`update()` call it uses with its own caches.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from swarm.models.family import ModelFamily


class SessionKVCache:
    """Preallocated keys/values for a run of consecutive blocks of one inference session."""

    def __init__(
        self,
        first_block: int,
        num_blocks: int,
        batch_size: int,
        max_length: int,
        config: PretrainedConfig,
        dtype: torch.dtype,
        device: torch.device,
    ):
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (num_blocks, batch_size, config.num_key_value_heads, max_length, head_dim)
        self.first_block = first_block
        self.max_length = max_length
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.position = 0  # tokens already stored; the next step writes from here

    @staticmethod
    def nbytes(num_blocks: int, batch_size: int, max_length: int, config: PretrainedConfig, dtype: torch.dtype) -> int:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        element = torch.finfo(dtype).bits // 8
        return 2 * num_blocks * batch_size * config.num_key_value_heads * max_length * head_dim * element

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


class SpanBackend:
    """The blocks [start, end) of one model, on one device, in one dtype."""

    def __init__(
        self,
        family: ModelFamily,
        config: PretrainedConfig,
        start: int,
        end: int,
        state_dict: dict[str, torch.Tensor],
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.family, self.config = family, config
        self.start, self.end = start, end
        self.dtype, self.device = dtype, device
        self.hidden_size: int = config.hidden_size  # read on every request; config attributes are slow
        self.blocks = nn.ModuleList()
        for index in range(start, end):
            with torch.device("meta"):
                block = family.make_block(config, index)
            prefix = family.block_tensor_prefix(index)
            weights = {name[len(prefix) :]: tensor for name, tensor in state_dict.items() if name.startswith(prefix)}
            block.load_state_dict(weights, strict=True, assign=True)
            self.blocks.append(block.to(device=device, dtype=dtype).eval().requires_grad_(False))
        self.rotary = family.make_rotary(config).to(device)

    def cache_bytes(self, num_blocks: int, batch_size: int, max_length: int) -> int:
        return SessionKVCache.nbytes(num_blocks, batch_size, max_length, self.config, self.dtype)

    def new_cache(self, first_block: int, num_blocks: int, batch_size: int, max_length: int) -> SessionKVCache:
        return SessionKVCache(first_block, num_blocks, batch_size, max_length, self.config, self.dtype, self.device)

    def _run(
        self,
        hidden: torch.Tensor,
        first: int,
        last: int,
        offset: int,
        prompts: torch.Tensor | None,
        cache: SessionKVCache | None,
    ) -> torch.Tensor:
        batch, length, _ = hidden.shape
        positions = torch.arange(offset, offset + length, device=self.device).unsqueeze(0).expand(batch, -1)
        position_embeddings = self.rotary(hidden, positions)
        mask = None
        if offset > 0 and length > 1:
            # SDPA's is_causal aligns top-left; with a cached prefix the causal diagonal is shifted.
            rows = torch.arange(length, device=self.device).unsqueeze(1) + offset
            mask = (torch.arange(offset + length, device=self.device).unsqueeze(0) <= rows)[None, None]
        for i, block in enumerate(self.blocks[first - self.start : last - self.start]):
            if prompts is not None:
                hidden = _add_prompt(hidden, prompts[i])
            hidden = block(
                hidden,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                position_embeddings=position_embeddings,
            )
        return hidden

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor, first: int, last: int, prompts: torch.Tensor | None = None) -> torch.Tensor:
        return self._run(hidden.to(self.device, self.dtype), first, last, 0, _cast(prompts, self), None)

    @torch.inference_mode()
    def inference_step(
        self,
        hidden: torch.Tensor,
        cache: SessionKVCache,
        prompts: torch.Tensor | None = None,
        hypo_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if hypo_ids is not None:
            cache.reorder(hypo_ids.to(self.device))
        first = cache.first_block
        last = first + cache.keys.shape[0]
        hidden = hidden.to(self.device, self.dtype)
        if cache.position > 0:
            prompts = None  # deep prompts apply to the leading tokens, which the first step carried
        output = self._run(hidden, first, last, cache.position, _cast(prompts, self), cache)
        cache.position += hidden.shape[1]
        return output

    def backward(
        self,
        hidden: torch.Tensor,
        grad_outputs: torch.Tensor,
        first: int,
        last: int,
        prompts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gradients of the span's output w.r.t. its input hidden states (and deep prompts)."""
        with torch.enable_grad():
            hidden = hidden.to(self.device, self.dtype).detach().requires_grad_(True)
            prompts = _cast(prompts, self)
            if prompts is not None:
                prompts = prompts.detach().requires_grad_(True)
            output = self._run(hidden, first, last, 0, prompts, None)
            inputs = [hidden] if prompts is None else [hidden, prompts]
            grads = torch.autograd.grad(output, inputs, grad_outputs.to(self.device, self.dtype))
        return grads[0], (grads[1] if prompts is not None else None)


def _add_prompt(hidden: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    length = min(prompt.shape[1], hidden.shape[1])
    return torch.cat([hidden[:, :length] + prompt[:, :length], hidden[:, length:]], dim=1)


def _cast(tensor: torch.Tensor | None, backend: SpanBackend) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(backend.device, backend.dtype)
