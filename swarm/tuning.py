"""Prompt tuning from a JSONL file, for people who do not write training code (`manage.py tune`).

Reads one JSON object per line, takes its text field, and trains the model's prompts with
transformers' Trainer through the swarm; the output folder is what
`AutoDistributedModelForCausalLM.from_pretrained(output, initial_peers=...)` loads.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from swarm.client.model import AutoDistributedModelForCausalLM
from swarm.client.ptune import check_tuning_options


class TuningDataError(ValueError):
    """The training data cannot be used; the message says where and why."""


def read_texts(path: str | Path, field: str = "text") -> list[str]:
    """The `field` of every line of a JSONL file; any bad line is an error that names it."""
    path = Path(path)
    if not path.is_file():
        raise TuningDataError(f"{path}: no such file")
    texts = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TuningDataError(
                    f"{path}, line {number}: not JSON ({e.msg}); the data must be JSON Lines, one object per line"
                ) from None
            if not isinstance(record, dict):
                raise TuningDataError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}")
            text = record.get(field)
            if not isinstance(text, str) or not text.strip():
                keys = ", ".join(sorted(record)) or "none"
                raise TuningDataError(
                    f"{path}, line {number}: no {field!r} text (its keys: {keys}); choose the field with --text-field"
                )
            texts.append(text)
    if not texts:
        raise TuningDataError(f"{path} holds no examples")
    return texts


@dataclasses.dataclass
class TuningJob:
    model: str
    data: str
    output: str
    initial_peers: Sequence[str]
    tuning_mode: str = "ptune"
    pre_seq_len: int = 16
    epochs: float = 1.0
    batch_size: int = 2
    learning_rate: float = 1e-2
    max_tokens: int = 256  # longer examples are cut
    text_field: str = "text"
    save_steps: int = 100
    dht_prefix: str | None = None

    def check(self) -> list[str]:
        """Everything that can be checked before joining the swarm; returns the texts."""
        check_tuning_options(self.tuning_mode, self.pre_seq_len)
        for name in ("epochs", "batch_size", "learning_rate", "max_tokens", "save_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name.replace('_', '-')} must be positive")
        return read_texts(self.data, self.text_field)


def run_tuning(job: TuningJob, report: Callable[[str], None] = print) -> Path:
    """Train, save the final prompts to job.output, and return that folder."""
    texts = job.check()
    tokenizer = AutoTokenizer.from_pretrained(job.model)
    examples = [
        {"input_ids": ids, "labels": ids}
        for ids in tokenizer(texts, truncation=True, max_length=job.max_tokens).input_ids
    ]
    model = AutoDistributedModelForCausalLM.from_pretrained(
        job.model,
        initial_peers=job.initial_peers,
        dht_prefix=job.dht_prefix,
        tuning_mode=job.tuning_mode,
        pre_seq_len=job.pre_seq_len,
    )
    try:
        args = TrainingArguments(
            output_dir=job.output,
            num_train_epochs=job.epochs,
            per_device_train_batch_size=job.batch_size,
            learning_rate=job.learning_rate,
            save_steps=job.save_steps,
            save_total_limit=2,
            logging_steps=1,
            report_to="none",
            disable_tqdm=True,  # LossProgress draws the bar
            use_cpu=True,  # the client's few weights; the blocks run on the servers
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=examples,
            data_collator=_right_padding_collator(tokenizer),
            callbacks=[LossProgress(report)],
        )
        trainer.remove_callback(PrinterCallback)  # LossProgress reports the loss, one line per step
        trainer.train()
        model.save_pretrained(job.output)
        tokenizer.save_pretrained(job.output)
    finally:
        model.close()
    return Path(job.output)


class LossProgress(TrainerCallback):
    """A progress bar over the optimizer steps, and the loss of every step as a line of its own."""

    def __init__(self, report: Callable[[str], None]):
        self.report, self.bar = report, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="Tuning", unit="step")

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs):
        if logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}")
            self.bar.clear()
            self.report(f"step {state.global_step}/{state.max_steps}: loss {logs['loss']:.4f}")
            self.bar.refresh()

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


def _right_padding_collator(tokenizer) -> Callable[[list[dict[str, list[int]]]], dict[str, Any]]:
    """Pad on the right (what the servers' causal blocks allow); padded label positions predict nothing."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def collate(batch: list[dict[str, list[int]]]) -> dict[str, Any]:
        longest = max(len(example["input_ids"]) for example in batch)
        input_ids = torch.full((len(batch), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, example in enumerate(batch):
            input_ids[row, : len(example["input_ids"])] = torch.tensor(example["input_ids"])
            mask[row, : len(example["input_ids"])] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": input_ids.masked_fill(mask == 0, -100)}

    return collate
