"""The shipped demo models (swarm/demo_model/, a tiny Llama; swarm/demo_moe_model/, a tiny Mixtral) load offline,
are small, share one tokenizer, and write English."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from config.demo_training import TOKENIZER_FILES, build_demo_model
from swarm.demo_models import DEMO_MODEL_PATH, DEMO_MOE_MODEL_PATH

CHECKPOINTS = {"llama": DEMO_MODEL_PATH, "mixtral": DEMO_MOE_MODEL_PATH}


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def path(family) -> Path:
    return CHECKPOINTS[family]


@pytest.fixture(scope="module")
def tokenizer(path):
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def training_words() -> set[str]:
    from pydoc_data.topics import topics

    return {w.lower() for text in topics.values() for w in re.findall(r"[A-Za-z]+", text)}


def test_shipped_folder_is_small(path) -> None:
    files = [f for f in path.iterdir() if f.is_file()]
    expected = {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "training.json"}
    assert expected <= {f.name for f in files}
    assert sum(f.stat().st_size for f in files) <= 16 * 1024 * 1024


def test_config_is_small_with_gqa(family, model) -> None:
    config = model.config
    assert config.model_type == family
    assert config.num_hidden_layers == 8
    assert config.hidden_size == 256
    assert config.num_attention_heads == 8
    assert config.num_key_value_heads == 4
    assert not config.tie_word_embeddings
    assert model.dtype == torch.float32
    if family == "mixtral":
        assert (config.num_local_experts, config.num_experts_per_tok) == (4, 2)


def test_moe_demo_reuses_the_llama_tokenizer() -> None:
    copied = [name for name in TOKENIZER_FILES if (DEMO_MODEL_PATH / name).is_file()]
    assert "tokenizer.json" in copied
    for name in copied:
        assert (DEMO_MOE_MODEL_PATH / name).read_bytes() == (DEMO_MODEL_PATH / name).read_bytes(), name


def test_both_demos_stop_on_the_same_tokens() -> None:
    configs = [GenerationConfig.from_pretrained(p) for p in CHECKPOINTS.values()]
    assert configs[0].eos_token_id == configs[1].eos_token_id and len(configs[0].eos_token_id) == 2


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


@pytest.mark.parametrize("prompt", ["The function", "The function returns the value of"])
def test_greedy_generation_is_english_words(tokenizer, model, prompt) -> None:
    inputs = tokenizer(prompt, return_tensors="pt")
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


@pytest.mark.parametrize("build_family", ["llama", "mixtral"])
def test_build_demo_model_quick(tmp_path: Path, build_family: str) -> None:
    logs: list[str] = []
    build_demo_model(tmp_path, family=build_family, train_seconds=2, seed=1, max_docs=8, log=logs.append)
    assert any("parameters" in line for line in logs)
    assert (tmp_path / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert model.config.model_type == build_family
    assert model.config.num_key_value_heads == 4
    assert len(tokenizer) == model.config.vocab_size
    if build_family == "mixtral":
        assert model.config.num_local_experts == 4
        assert (tmp_path / "tokenizer.json").read_bytes() == (DEMO_MODEL_PATH / "tokenizer.json").read_bytes()
    inputs = tokenizer("The", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert inputs["input_ids"].shape[1] < out.shape[1] <= inputs["input_ids"].shape[1] + 3


def test_build_rejects_an_unknown_family(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown demo family"):
        build_demo_model(tmp_path, family="gpt2", train_seconds=0)
