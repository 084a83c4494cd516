"""The shipped demo model (swarm/demo_model/) loads offline, is small, and writes English."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from swarm.demo import DEMO_MODEL_PATH, build_demo_model


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEMO_MODEL_PATH)


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(DEMO_MODEL_PATH, dtype=torch.float32).eval()


def training_words() -> set[str]:
    from pydoc_data.topics import topics

    return {w.lower() for text in topics.values() for w in re.findall(r"[A-Za-z]+", text)}


def test_shipped_folder_is_small() -> None:
    files = [f for f in DEMO_MODEL_PATH.iterdir() if f.is_file()]
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {f.name for f in files}
    assert sum(f.stat().st_size for f in files) <= 16 * 1024 * 1024


def test_config_is_small_llama_with_gqa(model) -> None:
    config = model.config
    assert config.model_type == "llama"
    assert config.num_hidden_layers == 8
    assert config.num_attention_heads == 8
    assert config.num_key_value_heads == 4
    assert model.dtype == torch.float32


def test_tokenizer_special_tokens_and_round_trip(tokenizer, model) -> None:
    assert len(tokenizer) == model.config.vocab_size
    assert tokenizer.bos_token_id == model.config.bos_token_id
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None
    text = "The function returns a value, or raises an exception."
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_chat_template_with_generation_prompt(tokenizer) -> None:
    messages = [{"role": "user", "content": "Explain the while statement."}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "Explain the while statement." in text
    assert text.startswith(tokenizer.bos_token)
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    without = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert not without.endswith("assistant<|end_header_id|>\n\n")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1  # the template adds BOS once, encode must not


def test_greedy_generation_is_english_words(tokenizer, model) -> None:
    inputs = tokenizer("The function", return_tensors="pt")
    with torch.no_grad():
        # min_new_tokens: judge a full 40 tokens even if the model would stop at a sentence end.
        out = model.generate(**inputs, max_new_tokens=40, min_new_tokens=40, do_sample=False)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    words = [w.strip(".,;:()\"'*!?") for w in text.split()]
    words = [w for w in words if w]
    assert len(words) >= 10, text
    vocab = training_words()
    known = [w for w in words if w.isalpha() and w.lower() in vocab]
    assert len(known) / len(words) >= 0.6, text


def test_build_demo_model_quick(tmp_path: Path) -> None:
    logs: list[str] = []
    build_demo_model(tmp_path, train_seconds=2, seed=1, max_docs=8, log=logs.append)
    assert any("parameters" in line for line in logs)
    assert (tmp_path / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert model.config.num_key_value_heads == 4
    assert len(tokenizer) == model.config.vocab_size
    inputs = tokenizer("The", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert inputs["input_ids"].shape[1] < out.shape[1] <= inputs["input_ids"].shape[1] + 3
