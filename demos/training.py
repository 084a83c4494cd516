"""The demos' training loop: AdamW on random batches for a wall-clock budget.

The loop owns the optimiser, the schedule (which follows elapsed time, so any budget ends annealed) and
the logging; what a batch is and what it is scored by comes in as a `Step`: next-token prediction for
the demo models (`language_modeling_step`), distillation for the draft (`demos.distillation`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

# Windows are short (CPU budget) but long enough to cover a paragraph.
BLOCK_SIZE = 256
BATCH_SIZE = 8
LEARNING_RATE = 2e-3
MIN_LR_RATIO = 0.1
WARMUP_FRACTION = 0.05
WEIGHT_DECAY = 0.1
GRAD_CLIP = 1.0
LOG_EVERY_S = 20.0

# Draws one batch with the generator; returns (what to minimise, the loss to log, tokens in the batch).
Step = Callable[[torch.Generator], tuple[torch.Tensor, float, int]]


def language_modeling_step(model, data: torch.Tensor, batch_size: int = BATCH_SIZE) -> Step:
    """Next-token cross-entropy on random windows of `data`.

    A sparse MoE also gets its router's load-balancing loss (scaled by the config's coefficient), so
    that every expert learns; the logged loss is the cross-entropy alone, comparable across families.
    """
    aux_coef = getattr(model.config, "router_aux_loss_coef", 0.0)  # 0 for dense models
    forward_options = {"output_router_logits": True} if aux_coef else {}
    block = min(BLOCK_SIZE, len(data) - 1)

    def step(gen: torch.Generator) -> tuple[torch.Tensor, float, int]:
        starts = torch.randint(0, len(data) - block, (batch_size,), generator=gen)
        batch = torch.stack([data[s : s + block + 1] for s in starts.tolist()])
        inputs, targets = batch[:, :-1], batch[:, 1:]  # next-token prediction, shifted here
        outputs = model(input_ids=inputs, **forward_options)
        logits = outputs.logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        objective = loss + aux_coef * outputs.aux_loss if aux_coef else loss
        return objective, loss.item(), inputs.numel()

    return step


def lr_at(progress: float, learning_rate: float = LEARNING_RATE) -> float:
    """Linear warmup then cosine decay to MIN_LR_RATIO, over the fraction of time spent."""
    if progress < WARMUP_FRACTION:
        return learning_rate * max(progress, 1e-3) / WARMUP_FRACTION
    decay = min(1.0, (progress - WARMUP_FRACTION) / (1.0 - WARMUP_FRACTION))
    return learning_rate * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * decay)))


def _optimizer(model, learning_rate: float) -> torch.optim.Optimizer:
    # No weight decay on norms (1-D tensors); the usual GPT recipe.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8)


def train(
    model,
    step: Step,
    *,
    train_seconds: float,
    seed: int,
    learning_rate: float = LEARNING_RATE,
    log: Callable[[str], object] = print,
) -> dict[str, float]:
    """Run `step` and AdamW until `train_seconds` have passed (at least one step); the model ends in eval mode.

    The step count depends on the machine, so only the seed (data order) is deterministic.
    """
    gen = torch.Generator().manual_seed(seed)
    optimizer = _optimizer(model, learning_rate)
    model.train()

    start = last_log = time.monotonic()
    steps, tokens, window_loss, window_steps, recent_loss = 0, 0, 0.0, 0, float("nan")
    while True:
        elapsed = time.monotonic() - start
        if steps > 0 and elapsed >= train_seconds:
            break
        lr = lr_at(elapsed / train_seconds if train_seconds > 0 else 1.0, learning_rate)
        for group in optimizer.param_groups:
            group["lr"] = lr

        objective, loss, batch_tokens = step(gen)
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()

        steps += 1
        tokens += batch_tokens
        window_loss += loss
        window_steps += 1
        now = time.monotonic()
        if now - last_log >= LOG_EVERY_S or now - start >= train_seconds:
            recent_loss = window_loss / window_steps
            log(
                f"step {steps:5d} | {now - start:6.1f}s | loss {recent_loss:.3f} | lr {lr:.2e}"
                f" | {tokens / (now - start):6.0f} tok/s"
            )
            last_log, window_loss, window_steps = now, 0.0, 0
    model.eval()
    return {"steps": steps, "tokens": tokens, "loss": recent_loss, "seconds": time.monotonic() - start}
