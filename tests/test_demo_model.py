"""The shipped demo models (swarm/demo_model/, a tiny Llama; swarm/demo_moe_model/, a tiny Mixtral) load offline,
are small, share one tokenizer, and write English; the shipped draft (swarm/demo_draft_model/) shares it too and
speculates for the Llama demo without changing its output."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from demos.build import DEFAULT_TRAIN_SECONDS, build_demo_model
from demos.corpus import TOKENIZER_FILES, encode_corpus, load_corpus
from demos.distillation import (
    distillation_step,
    greedy_agreement,
    init_from_teacher,
    speculation_figures,
    teacher_targets,
    tokens_per_step,
)
from demos.shapes import make_model
from demos.training import train
from swarm.demo_models import DEMO_DRAFT_MODEL_PATH, DEMO_MODEL_PATH, DEMO_MOE_MODEL_PATH

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


# The draft ---------------------------------------------------------------------------------------------------------

DRAFT_LIMIT_BYTES = 3_000_000  # the 3 MB, tokenizer files included


@pytest.fixture(scope="module")
def demo():
    return AutoModelForCausalLM.from_pretrained(DEMO_MODEL_PATH, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def draft():
    return AutoModelForCausalLM.from_pretrained(DEMO_DRAFT_MODEL_PATH, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def demo_tokenizer():
    return AutoTokenizer.from_pretrained(DEMO_MODEL_PATH)


def test_the_draft_is_tiny_and_shares_the_demo_tokenizer(draft) -> None:
    files = [f for f in DEMO_DRAFT_MODEL_PATH.iterdir() if f.is_file()]
    assert {"config.json", "model.safetensors", "generation_config.json", "training.json"} <= {f.name for f in files}
    assert sum(f.stat().st_size for f in files) <= DRAFT_LIMIT_BYTES
    for name in TOKENIZER_FILES:
        if (DEMO_MODEL_PATH / name).is_file():
            assert (DEMO_DRAFT_MODEL_PATH / name).read_bytes() == (DEMO_MODEL_PATH / name).read_bytes(), name
    tokenizer = AutoTokenizer.from_pretrained(DEMO_DRAFT_MODEL_PATH)
    assert len(tokenizer) == draft.config.vocab_size == 4096
    assert draft.config.model_type == "llama" and draft.config.tie_word_embeddings
    assert draft.config.num_hidden_layers <= 2


def test_the_draft_speculates_with_the_demo_special_tokens() -> None:
    demo_config = GenerationConfig.from_pretrained(DEMO_MODEL_PATH)
    config = GenerationConfig.from_pretrained(DEMO_DRAFT_MODEL_PATH)
    assert (config.num_assistant_tokens, config.num_assistant_tokens_schedule) == (8, "constant")  # see demos.shapes
    assert config.assistant_confidence_threshold == 0  # never stop drafting early: a round trip costs more
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(config, name) == getattr(demo_config, name), name


@pytest.mark.parametrize(
    "prompt",
    ["The function returns the value of", "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
     "Explain the while statement.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"],
    ids=["text", "chat"],
)  # fmt: skip
def test_greedy_with_the_draft_is_plain_greedy(demo, draft, demo_tokenizer, prompt) -> None:
    ids = demo_tokenizer(prompt, return_tensors="pt", add_special_tokens="<|begin" not in prompt)["input_ids"]
    with torch.no_grad():
        plain = demo.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
        assisted = demo.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False, assistant_model=draft
        )
    assert assisted.tolist() == plain.tolist()


def test_the_shipped_draft_agrees_with_the_demo_model(demo, draft, demo_tokenizer) -> None:
    """Distilled, not random: on held-out text the draft picks the demo's greedy token most of the time
    (a freshly initialised model of its shape almost never does)."""
    docs, chats = load_corpus(part="held_out")
    held_out = encode_corpus(demo_tokenizer, docs, chats)[:1024]
    assert greedy_agreement(draft, demo, held_out) >= 0.5
    recorded = json.loads((DEMO_DRAFT_MODEL_PATH / "training.json").read_text())
    assert {"parameters", "steps", "loss", "seconds", "greedy_agreement", "tokens_per_step"} <= set(recorded)


def test_a_draft_equal_to_its_teacher_has_no_loss_and_full_agreement(demo, demo_tokenizer) -> None:
    data = encode_corpus(demo_tokenizer, *load_corpus(max_docs=1))[:64]
    targets = teacher_targets(demo, data, block=16, top_k=demo.config.vocab_size)  # the whole distribution
    objective, kl, tokens = distillation_step(demo, targets, batch_size=2)(torch.Generator().manual_seed(0))
    assert abs(kl) < 1e-4 and tokens == 32
    figures = speculation_figures(demo, demo, [data[:8].tolist()], new_tokens=12, draft_tokens=5)
    assert figures["generated_agreement"] == 1.0
    assert figures["tokens_per_step"] > 3  # 6 a step but the last (an EOS may come early)


def test_tokens_per_step_counts_accepted_runs_plus_the_correction() -> None:
    assert tokens_per_step([True] * 12, 5) == (12, 2)  # 5 drafts + 1 own token, twice
    assert tokens_per_step([False] * 4, 5) == (4, 4)  # every draft wrong: one token a step
    assert tokens_per_step([True, True, False, True], 5) == (4, 2)  # 2 kept + correction, then 1 left


def test_distillation_trains_a_draft_on_a_tiny_slice(demo, demo_tokenizer) -> None:
    data = encode_corpus(demo_tokenizer, *load_corpus(max_docs=1))[:128]
    targets = teacher_targets(demo, data, block=32, top_k=8)
    assert targets.inputs.shape == (4, 32) and targets.ids.shape == targets.logprobs.shape == (4, 32, 8)
    student = make_model(demo_tokenizer, "draft")
    init_from_teacher(student, demo)
    assert torch.equal(student.get_input_embeddings().weight, demo.get_output_embeddings().weight)  # tied
    before = [p.detach().clone() for p in student.parameters()]
    step = distillation_step(student, targets, batch_size=2, ce_weight=0.1)
    stats = train(student, step, train_seconds=0, seed=0, log=lambda line: None)
    assert stats["steps"] == 1 and stats["loss"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_build_a_draft_quick(tmp_path: Path) -> None:
    logs: list[str] = []
    build_demo_model(tmp_path, family="draft", train_seconds=1, seed=1, max_docs=2, log=logs.append)
    assert any("parameters" in line for line in logs)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert model.config.tie_word_embeddings and model.config.vocab_size == 4096
    assert (tmp_path / "tokenizer.json").read_bytes() == (DEMO_MODEL_PATH / "tokenizer.json").read_bytes()
    assert GenerationConfig.from_pretrained(tmp_path).num_assistant_tokens_schedule == "constant"
    assert sum(f.stat().st_size for f in tmp_path.iterdir()) <= DRAFT_LIMIT_BYTES


def test_the_command_lives_in_the_demos_app_and_builds_drafts() -> None:
    from django.core.management import get_commands, load_command_class

    assert get_commands()["makedemomodel"] == "demos"
    parser = load_command_class("demos", "makedemomodel").create_parser("manage.py", "makedemomodel")
    family = next(action for action in parser._actions if "--family" in action.option_strings)
    assert set(family.choices) == {"llama", "mixtral", "draft"}


def test_the_commands_defaults_rebuild_the_shipped_draft() -> None:
    """`makedemomodel --family draft` with no other option trains for as long, from the same seed, as the
    shipped draft did (and on its teacher's own greedy continuations too)."""
    from django.core.management import load_command_class

    parser = load_command_class("demos", "makedemomodel").create_parser("manage.py", "makedemomodel")
    options = vars(parser.parse_args(["--family", "draft"]))
    assert options["train_seconds"] is None and options["seed"] == 0  # None: the family's DEFAULT_TRAIN_SECONDS
    recorded = json.loads((DEMO_DRAFT_MODEL_PATH / "training.json").read_text())
    assert recorded["seed"] == 0 and recorded["generated_tokens"] > recorded["corpus_tokens"] / 2
    assert DEFAULT_TRAIN_SECONDS["draft"] <= recorded["seconds"] < DEFAULT_TRAIN_SECONDS["draft"] + 5
