"""Distilling the draft model from the Llama demo, and measuring how often the two agree.

The teacher is ~5x the student, so running it at every training step would cost most of the budget: its
top-k log-probabilities are computed once, on fixed windows of the corpus, and every step scores the
student on some of those windows, at every position, by KL(teacher || student) over the teacher's top k
tokens plus one bucket for the rest (`top_k_kl`; greedy agreement is decided in the head), plus an
optional small next-token cross-entropy.

Speculative greedy decoding keeps a draft token exactly when it is the token the demo model would
pick itself, so the figure that matters is agreement: how often the draft's argmax is the demo's, along
the demo's OWN greedy output. So the windows are also taken from that output (sequence-level
distillation, `teacher_continuations`): the teacher's greedy continuations of prompts from the training
corpus, scored the same way.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from demos.shapes import DRAFT_TOKENS
from demos.training import BLOCK_SIZE, Step

TOP_K = 64  # the teacher's 64 likeliest tokens hold ~75% of its probability on this corpus
DISTILL_BATCH_SIZE = 4  # small batches, many steps: what a CPU budget of minutes allows
DRAFT_LEARNING_RATE = 3e-3
_TEACHER_BATCH = 16  # windows per teacher forward pass
# Sequence-level distillation: prompts of the corpus, each continued greedily by the teacher.
PROMPT_TOKENS = 16  # as long as a held-out document opening
PROMPT_STRIDE = 128  # a prompt every this many corpus tokens (plus every opening and chat question)
CONTINUATION_TOKENS = 96  # longer than what speculation_figures measures (64)
_GENERATE_BATCH = 256  # prompts of one length per teacher.generate() call (larger is faster a token)


@dataclass
class TeacherTargets:
    """The teacher's top-k next-token log-probabilities at every position of fixed windows."""

    inputs: torch.Tensor  # (windows, block) token ids
    ids: torch.Tensor  # (windows, block, k) int16: the vocabulary fits
    logprobs: torch.Tensor  # (windows, block, k) float32


def concat_targets(parts: Sequence[TeacherTargets]) -> TeacherTargets:
    """One set of targets from several (same window length and k), sampled uniformly together."""
    return TeacherTargets(*(torch.cat([getattr(p, name) for p in parts]) for name in ("inputs", "ids", "logprobs")))


def _windows(data: torch.Tensor, block: int) -> torch.Tensor:
    """Consecutive non-overlapping windows (the last partial one dropped)."""
    block = min(block, len(data))
    return data[: len(data) // block * block].view(-1, block)


@torch.inference_mode()
def teacher_targets(teacher, data: torch.Tensor, *, block: int = BLOCK_SIZE, top_k: int = TOP_K) -> TeacherTargets:
    inputs = _windows(data, block)
    ids, logprobs = [], []
    for chunk in inputs.split(_TEACHER_BATCH):
        top = teacher(input_ids=chunk).logits.float().log_softmax(-1).topk(top_k, dim=-1)
        ids.append(top.indices.to(torch.int16))
        logprobs.append(top.values)
    return TeacherTargets(inputs, torch.cat(ids), torch.cat(logprobs))


def training_prompts(tokenizer, docs: list[str], chats: list[tuple[str, str]], data: torch.Tensor) -> list[list[int]]:
    """Prompts like the held-out ones, from the training part: every document opening and chat question,
    plus a `PROMPT_TOKENS` slice of the corpus stream every `PROMPT_STRIDE` tokens."""
    backend = tokenizer.backend_tokenizer
    prompts = [backend.encode(doc).ids[:PROMPT_TOKENS] for doc in docs]
    for question, _ in chats:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        prompts.append(backend.encode(text, add_special_tokens=False).ids)
    stream = data.tolist()
    prompts += [stream[s : s + PROMPT_TOKENS] for s in range(0, len(stream) - PROMPT_TOKENS, PROMPT_STRIDE)]
    return prompts


@torch.inference_mode()
def teacher_continuations(
    teacher, prompts: Sequence[list[int]], *, new_tokens: int = CONTINUATION_TOKENS, batch: int = _GENERATE_BATCH
) -> torch.Tensor:
    """Each prompt followed by the teacher's greedy continuation (its generation config's repetition
    penalty included, as in speculation_figures), cut after a stop token, all in one token stream.

    Prompts are batched by length, so no padding can change what the teacher generates."""
    stop = set(teacher.generation_config.eos_token_id or [])
    by_length: dict[int, list[list[int]]] = defaultdict(list)
    for prompt in prompts:
        if prompt:
            by_length[len(prompt)].append(prompt)
    stream: list[int] = []
    for length, group in sorted(by_length.items()):
        for start in range(0, len(group), batch):
            ids = torch.tensor(group[start : start + batch])
            output = teacher.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens
            )
            for row in output.tolist():
                end = next((i + 1 for i in range(length, len(row)) if row[i] in stop), len(row))
                stream += row[:end]
    return torch.tensor(stream, dtype=torch.long)


@torch.no_grad()
def init_from_teacher(student, teacher) -> None:
    """Start the draft from the teacher's own parts (it learns several times faster than from random):
    the teacher's output embedding as the tied embedding, its final norm, and for each draft block the
    teacher block of the same index, whose MLP keeps the units that write the most into the residual."""
    if student.config.hidden_size != teacher.config.hidden_size:
        raise ValueError("the draft starts from the teacher's parts only with the teacher's hidden size")
    student.get_output_embeddings().weight.copy_(teacher.get_output_embeddings().weight)
    student.model.norm.weight.copy_(teacher.model.norm.weight)
    for ours, theirs in zip(student.model.layers, teacher.model.layers):
        ours.self_attn.load_state_dict(theirs.self_attn.state_dict())
        ours.input_layernorm.load_state_dict(theirs.input_layernorm.state_dict())
        ours.post_attention_layernorm.load_state_dict(theirs.post_attention_layernorm.state_dict())
        mlp = theirs.mlp
        weight = mlp.down_proj.weight.norm(dim=0) * mlp.up_proj.weight.norm(dim=1) * mlp.gate_proj.weight.norm(dim=1)
        units = weight.topk(ours.mlp.up_proj.out_features).indices
        ours.mlp.gate_proj.weight.copy_(mlp.gate_proj.weight[units])
        ours.mlp.up_proj.weight.copy_(mlp.up_proj.weight[units])
        ours.mlp.down_proj.weight.copy_(mlp.down_proj.weight[:, units])


def top_k_kl(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) over the teacher's top k tokens and one bucket for all the others.

    Both arguments are log-probabilities of the same k tokens, (..., k). With the rest as a bucket the
    two distributions are complete, so this is a true KL (0 exactly when they agree on the k tokens),
    and the student is not pushed to give the tail less than the teacher does.
    """
    teacher_probs = teacher_logprobs.exp()
    teacher_rest = (1 - teacher_probs.sum(-1)).clamp(min=0)
    student_rest = (1 - student_logprobs.exp().sum(-1)).clamp(min=1e-6)
    head = (teacher_probs * (teacher_logprobs - student_logprobs)).sum(-1)
    return head + torch.xlogy(teacher_rest, teacher_rest) - teacher_rest * student_rest.log()


def distillation_step(
    student, targets: TeacherTargets, *, batch_size: int = DISTILL_BATCH_SIZE, ce_weight: float = 0.0
) -> Step:
    """A `demos.training.Step`: the top-k KL on random teacher windows (+ `ce_weight` * cross-entropy)."""

    def step(gen: torch.Generator) -> tuple[torch.Tensor, float, int]:
        rows = torch.randint(0, len(targets.inputs), (batch_size,), generator=gen)
        inputs = targets.inputs[rows]
        logits = student(input_ids=inputs).logits.float()
        student_logprobs = logits.log_softmax(-1).gather(-1, targets.ids[rows].long())
        kl = top_k_kl(targets.logprobs[rows], student_logprobs).mean()
        objective = kl
        if ce_weight:
            ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), inputs[:, 1:].reshape(-1))
            objective = kl + ce_weight * ce
        return objective, kl.item(), inputs.numel()

    return step


@torch.inference_mode()
def greedy_agreement(draft, teacher, data: torch.Tensor, *, block: int = BLOCK_SIZE) -> float:
    """The fraction of positions of `data` (teacher-forced) where the draft's argmax is the teacher's."""
    agree = total = 0
    for chunk in _windows(data, block).split(_TEACHER_BATCH):
        same = draft(input_ids=chunk).logits.argmax(-1) == teacher(input_ids=chunk).logits.argmax(-1)
        agree, total = agree + int(same.sum()), total + same.numel()
    return agree / total


def tokens_per_step(matches: list[bool], draft_tokens: int) -> tuple[int, int]:
    """(tokens, verification steps) for greedy speculation with a fixed draft length along one output.

    A step keeps the draft's run of matches (at most `draft_tokens`) plus the target's own next token.
    """
    position = steps = 0
    while position < len(matches):
        run = 0
        while run < draft_tokens and position + run < len(matches) and matches[position + run]:
            run += 1
        position, steps = position + run + 1, steps + 1
    return len(matches), steps


@torch.inference_mode()
def speculation_figures(
    draft, teacher, prompts: Sequence[list[int]], *, new_tokens: int = 64, draft_tokens: int = DRAFT_TOKENS
) -> dict[str, float]:
    """Along the teacher's own greedy outputs (with its generation config's repetition penalty, which
    assisted generation applies to the draft's proposals as well): how often the draft proposes the
    teacher's token, and how many tokens a verification step yields with `draft_tokens` drafts."""
    from transformers import RepetitionPenaltyLogitsProcessor

    penalty = teacher.generation_config.repetition_penalty or 1.0
    process = RepetitionPenaltyLogitsProcessor(penalty) if penalty != 1.0 else None
    stop = set(teacher.generation_config.eos_token_id or [])
    agree = total = tokens = steps = 0
    for prompt in prompts:
        ids = torch.tensor([prompt])
        output = teacher.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens)
        sequence = output[0].tolist()
        end = next((i + 1 for i in range(len(prompt), len(sequence)) if sequence[i] in stop), len(sequence))
        logits = draft(input_ids=output[:, : end - 1]).logits[0]
        matches = []
        for position in range(len(prompt) - 1, end - 1):  # the draft's guess for sequence[position + 1]
            scores = logits[position : position + 1]
            if process is not None:
                scores = process(output[:, : position + 1], scores.clone())
            matches.append(int(scores.argmax()) == sequence[position + 1])
        agree, total = agree + sum(matches), total + len(matches)
        made, taken = tokens_per_step(matches, draft_tokens)
        tokens, steps = tokens + made, steps + taken
    return {"generated_agreement": agree / max(total, 1), "tokens_per_step": tokens / max(steps, 1)}


def held_out_prompts(tokenizer, docs: list[str], chats: list[tuple[str, str]], count: int = 16) -> list[list[int]]:
    """Prompts the draft never trained on: half document openings (16 tokens), half chat questions."""
    backend = tokenizer.backend_tokenizer
    openings = [backend.encode(doc).ids[:16] for doc in docs]
    questions = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q, _ in chats
    ]
    asked = [backend.encode(text, add_special_tokens=False).ids for text in questions]
    chosen = openings[: count // 2]
    return chosen + asked[: count - len(chosen)]
