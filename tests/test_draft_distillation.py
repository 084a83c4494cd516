"""Sequence-level distillation of the draft: the teacher's own greedy continuations as training text."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from demos.corpus import encode_corpus, load_corpus
from demos.distillation import (
    PROMPT_TOKENS,
    concat_targets,
    teacher_continuations,
    teacher_targets,
    training_prompts,
)
from swarm.demo_models import DEMO_MODEL_PATH


@pytest.fixture(scope="module")
def teacher():
    return AutoModelForCausalLM.from_pretrained(DEMO_MODEL_PATH, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEMO_MODEL_PATH)


def _greedy_alone(teacher, prompt: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        row = teacher.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens)
    row = row[0].tolist()
    stop = set(teacher.generation_config.eos_token_id)
    end = next((i + 1 for i in range(len(prompt), len(row)) if row[i] in stop), len(row))
    return row[:end]


def test_continuations_are_the_teachers_greedy_outputs_one_prompt_at_a_time(teacher, tokenizer) -> None:
    """Batched by length, the stream is each prompt's own greedy output (cut after a stop token), in order
    of prompt length: batching changes nothing the draft is taught."""
    docs, chats = load_corpus(max_docs=2)
    data = encode_corpus(tokenizer, docs, chats)
    prompts = [data[:6].tolist(), data[40:46].tolist(), data[100:104].tolist()]
    stream = teacher_continuations(teacher, prompts, new_tokens=10, batch=2)
    expected = [token for p in (prompts[2], prompts[0], prompts[1]) for token in _greedy_alone(teacher, p, 10)]
    assert stream.dtype == torch.long and stream.tolist() == expected


def test_a_continuation_stops_after_the_teachers_stop_token(teacher, tokenizer) -> None:
    question = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tell me about the pass statement."}], add_generation_prompt=True, tokenize=False
    )
    prompt = tokenizer.backend_tokenizer.encode(question, add_special_tokens=False).ids
    stream = teacher_continuations(teacher, [prompt, []], new_tokens=128).tolist()  # an empty prompt is skipped
    assert stream[: len(prompt)] == prompt and len(stream) > len(prompt)
    assert stream[-1] in teacher.generation_config.eos_token_id  # the demo answers and stops well within 128
    assert not set(stream[len(prompt) : -1]) & set(teacher.generation_config.eos_token_id)


def test_training_prompts_are_like_the_held_out_ones(tokenizer) -> None:
    docs, chats = load_corpus(max_docs=3, part="train")
    data = encode_corpus(tokenizer, docs, chats)
    prompts = training_prompts(tokenizer, docs, chats, data)
    openings, questions, slices = (
        prompts[: len(docs)],
        prompts[len(docs) : len(docs) + len(chats)],
        prompts[len(docs) + len(chats) :],
    )
    assert all(p[0] == tokenizer.bos_token_id and len(p) == PROMPT_TOKENS for p in openings)
    header = tokenizer.backend_tokenizer.encode(
        "<|start_header_id|>assistant<|end_header_id|>\n\n", add_special_tokens=False
    ).ids
    assert questions and all(q[-len(header) :] == header for q in questions)
    assert slices and all(len(s) == PROMPT_TOKENS for s in slices) and slices[0] == data[:PROMPT_TOKENS].tolist()


def test_targets_of_corpus_and_continuations_are_sampled_together(teacher, tokenizer) -> None:
    data = encode_corpus(tokenizer, *load_corpus(max_docs=1))[:64]
    a, b = teacher_targets(teacher, data, block=16, top_k=4), teacher_targets(teacher, data[:32], block=16, top_k=4)
    both = concat_targets([a, b])
    assert both.inputs.shape == (6, 16) and both.ids.shape == both.logprobs.shape == (6, 16, 4)
    assert torch.equal(both.inputs[4:], b.inputs) and torch.equal(both.logprobs[:4], a.logprobs)
