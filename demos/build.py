"""Building a shipped demo model end to end (`manage.py makedemomodel`).

Three families, one recipe. The Llama demo trains the shared tokenizer and an 8-block Llama from scratch;
the Mixtral demo reuses that tokenizer and trains an 8-block sparse MoE the same way; the draft reuses it
too and is distilled from the Llama demo, as its assistant for speculative decoding. Each is saved in the
usual Hugging Face layout (safetensors, bfloat16) with a training.json of what it took, so
`AutoTokenizer` / `AutoModelForCausalLM.from_pretrained()` load them offline; the results ship in the
folders `swarm.demo_models` names, so nobody has to train them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from demos.corpus import copy_tokenizer_files, encode_corpus, load_corpus, train_tokenizer, wrap_tokenizer
from demos.distillation import (
    DRAFT_LEARNING_RATE,
    concat_targets,
    distillation_step,
    greedy_agreement,
    held_out_prompts,
    init_from_teacher,
    speculation_figures,
    teacher_continuations,
    teacher_targets,
    training_prompts,
)
from demos.shapes import FAMILIES, make_model
from demos.training import LEARNING_RATE, language_modeling_step, train
from swarm.demo_models import DEMO_DRAFT_MODEL_PATH, DEMO_MODEL_PATH, DEMO_MOE_MODEL_PATH

DEFAULT_OUTPUT: dict[str, Path] = {
    "llama": DEMO_MODEL_PATH,
    "mixtral": DEMO_MOE_MODEL_PATH,
    "draft": DEMO_DRAFT_MODEL_PATH,
}

# `makedemomodel`'s budgets (the draft's is the shipped draft's); the steps they buy depend on the machine.
DEFAULT_TRAIN_SECONDS: dict[str, float] = {"llama": 300, "mixtral": 300, "draft": 900}

Log = Callable[[str], object]


def build_demo_model(
    output_dir: str | Path | None = None,
    *,
    family: str = "llama",
    train_seconds: float = 300,
    seed: int = 0,
    log: Log = print,
    max_docs: int | None = None,
    num_threads: int = 2,
    tokenizer_from: str | Path = DEMO_MODEL_PATH,
) -> Path:
    """Train a demo model of `family` and save it to `output_dir` (default: the family's shipped folder).

    The Llama demo trains its own tokenizer; the others copy the tokenizer files of `tokenizer_from`
    (the Llama demo's), and the draft is distilled from the model saved there, so rebuild the Llama demo
    first. `max_docs` limits the corpus (tests use it to stay fast). The step count depends on the
    machine, so only the seeds (data order, initialisation) are deterministic.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown demo family {family!r}; expected one of {FAMILIES}")
    output_dir = Path(output_dir) if output_dir is not None else DEFAULT_OUTPUT[family]
    output_dir.mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)  # the machine is shared; a small model gains little more
    try:
        torch.manual_seed(seed)
        source = Path(tokenizer_from)
        if family == "draft":
            model, record = _distill_draft(source, train_seconds, seed, max_docs, log)
        else:
            model, record, tokenizer = _train_from_scratch(family, source, train_seconds, seed, max_docs, log)
        _save(model, record, output_dir)
        if family == "llama":
            tokenizer.save_pretrained(output_dir)
        else:
            copy_tokenizer_files(source, output_dir)  # byte for byte: one vocabulary for all demos
        size = _ship(output_dir)
        log(f"saved {family} to {output_dir} ({size / 1e6:.2f} MB)")
        return output_dir
    finally:
        torch.set_num_threads(previous_threads)


def _describe(model, family: str, log: Log) -> int:
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {family}, {n_params / 1e6:.2f}M parameters ({n_params * 2 / 1e6:.1f} MB in bfloat16)")
    return n_params


def _train_from_scratch(family: str, source: Path, train_seconds: float, seed: int, max_docs: int | None, log: Log):
    docs, chats = load_corpus(max_docs)
    log(f"corpus: {len(docs)} documents, {sum(map(len, docs))} characters, {len(chats)} chat pairs")
    if family == "llama":
        tokenizer = wrap_tokenizer(train_tokenizer(docs))
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source)
    data = encode_corpus(tokenizer, docs, chats)
    log(f"tokenizer: {len(tokenizer)} tokens; corpus is {len(data)} tokens")

    model = make_model(tokenizer, family)
    n_params = _describe(model, family, log)
    step = language_modeling_step(model, data)
    stats = train(model, step, train_seconds=train_seconds, seed=seed, learning_rate=LEARNING_RATE, log=log)
    log(f"trained {stats['steps']} steps, {stats['tokens']} tokens in {stats['seconds']:.0f}s")
    return model, {"seed": seed, "parameters": n_params, "corpus_tokens": len(data), **stats}, tokenizer


def _distill_draft(teacher_path: Path, train_seconds: float, seed: int, max_docs: int | None, log: Log):
    """The draft learns the teacher's next-token distributions on the corpus minus the held-out topics
    and along the teacher's own greedy continuations of prompts from it, then is measured against the
    teacher on those (after a bfloat16 round trip, as it ships)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32).eval()
    docs, chats = load_corpus(max_docs, part="train")
    data = encode_corpus(tokenizer, docs, chats)
    log(f"corpus: {len(docs)} documents, {len(chats)} chat pairs, {len(data)} tokens (held-out topics left out)")
    prompts = training_prompts(tokenizer, docs, chats, data)
    generated = teacher_continuations(teacher, prompts)
    log(f"teacher: greedy continuations of {len(prompts)} prompts, {len(generated)} tokens")
    targets = concat_targets([teacher_targets(teacher, data), teacher_targets(teacher, generated)])
    log(f"teacher: top-{targets.ids.shape[-1]} targets on {len(targets.inputs)} windows")

    model = make_model(tokenizer, "draft")
    init_from_teacher(model, teacher)
    n_params = _describe(model, "draft", log)
    step = distillation_step(model, targets)
    stats = train(model, step, train_seconds=train_seconds, seed=seed, learning_rate=DRAFT_LEARNING_RATE, log=log)
    log(f"distilled {stats['steps']} steps, {stats['tokens']} tokens in {stats['seconds']:.0f}s")

    model.to(torch.bfloat16).to(torch.float32)  # measure the weights that ship
    figures = _measure(model, teacher, tokenizer, max_docs)
    log(", ".join(f"{name} {value:.3f}" for name, value in figures.items()))
    record = {"seed": seed, "parameters": n_params, "corpus_tokens": len(data), "generated_tokens": len(generated)}
    return model, record | stats | figures


def _measure(draft, teacher, tokenizer, max_docs: int | None) -> dict[str, float]:
    docs, chats = load_corpus(max_docs, part="held_out")
    if not docs:
        return {}
    held_out = encode_corpus(tokenizer, docs, chats)
    figures = {"greedy_agreement": greedy_agreement(draft, teacher, held_out)}
    return figures | speculation_figures(draft, teacher, held_out_prompts(tokenizer, docs, chats))


def _save(model, record: dict[str, Any], output_dir: Path) -> None:
    model.to(torch.bfloat16)
    model.save_pretrained(output_dir, safe_serialization=True)
    (output_dir / "training.json").write_text(json.dumps(record, indent=2) + "\n")


def _ship(output_dir: Path) -> int:
    """Make the folder's files readable by all (safetensors writes 0600; the folder ships in the repo);
    returns their total size."""
    files = [f for f in output_dir.iterdir() if f.is_file()]
    for f in files:
        f.chmod(0o644)
    return sum(f.stat().st_size for f in files)
