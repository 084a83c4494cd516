"""Fine-tuning through real servers with transformers' Trainer, as the README's snippet shows:
prompt tuning trains, saves only what trained, loads and resumes; a classifier learns."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import safetensors.torch
import torch
from django.core.management import CommandError, call_command
from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

from swarm import AutoDistributedModelForCausalLM, AutoDistributedModelForSequenceClassification
from tests.conftest import DEMO_MODEL, ROOT, start_swarm

pytestmark = pytest.mark.integration

TARGET = "The answer to the question is forty-two."


@pytest.fixture(scope="module")
def swarm(make_swarm):
    swarm = start_swarm(make_swarm, "0:4", "4:8")
    yield swarm
    swarm.close()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEMO_MODEL)


def _training_args(output_dir, **overrides) -> TrainingArguments:
    """The README's arguments, plus what a test needs (CPU, no reporting, a learning rate for prompts)."""
    args = dict(
        output_dir=str(output_dir),
        num_train_epochs=1,
        per_device_train_batch_size=2,
        save_steps=10,
        save_total_limit=2,
        use_cpu=True,
        report_to="none",
        logging_steps=1,
        learning_rate=3e-2,
        seed=0,
        disable_tqdm=True,
    )
    return TrainingArguments(**{**args, **overrides})


def _ptune_model(swarm, source=DEMO_MODEL, **kwargs):
    kwargs.setdefault("tuning_mode", "ptune")
    kwargs.setdefault("pre_seq_len", 16)
    return AutoDistributedModelForCausalLM.from_pretrained(source, initial_peers=swarm.initial_peers, **kwargs)


@pytest.fixture(scope="module")
def trained(swarm, tokenizer, tmp_path_factory):
    """One uninterrupted Trainer run of 20 steps (checkpoints at 10 and 20), as the snippet runs it."""
    output_dir = tmp_path_factory.mktemp("ptune")
    ids = tokenizer(TARGET).input_ids
    dataset = [{"input_ids": ids, "labels": ids}] * 40
    torch.manual_seed(0)  # the prompts' initial values
    model = _ptune_model(swarm)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    trainer = Trainer(model=model, args=_training_args(output_dir), train_dataset=dataset)
    trainer.train()
    yield model, before, trainer, dataset, output_dir
    model.close()


def test_trainer_lowers_the_loss_and_changes_only_the_prompts(trained):
    model, before, trainer, _, _ = trained
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 20
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    after = model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {"prompt_tuning.prompt_embeddings.weight"}


def test_checkpoints_hold_only_the_trainable_weights_and_load_back(trained, swarm):
    model, _, _, _, output_dir = trained
    checkpoints = sorted(p.name for p in output_dir.iterdir() if p.name.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-10", "checkpoint-20"]
    saved = safetensors.torch.load_file(output_dir / "checkpoint-20" / "model.safetensors")
    assert set(saved) == {"prompt_tuning.prompt_embeddings.weight"}
    config = json.loads((output_dir / "checkpoint-20" / "config.json").read_text())
    assert (config["tuning_mode"], config["pre_seq_len"]) == ("ptune", 16)
    assert config["base_model_name_or_path"] == DEMO_MODEL

    loaded = _ptune_model(swarm, str(output_dir / "checkpoint-20"), tuning_mode=None, pre_seq_len=None)
    try:
        weight = loaded.prompt_tuning.prompt_embeddings.weight
        assert torch.equal(weight, model.prompt_tuning.prompt_embeddings.weight)
        assert weight.dtype == torch.float32 and weight.requires_grad
        input_ids = torch.tensor([[0, 485, 299, 88]])
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits, atol=1e-5, rtol=0)
    finally:
        loaded.close()


def test_training_resumes_from_a_checkpoint(trained, swarm, tmp_path):
    model, _, _, dataset, output_dir = trained
    torch.manual_seed(1)  # other initial prompts: the checkpoint's must replace them
    resumed_model = _ptune_model(swarm)
    try:
        steps = StepCounter()
        trainer = Trainer(model=resumed_model, args=_training_args(tmp_path), train_dataset=dataset, callbacks=[steps])
        trainer.train(resume_from_checkpoint=str(output_dir / "checkpoint-10"))
        assert trainer.state.global_step == 20
        assert steps.count == 10  # only steps 11..20 ran again
        torch.testing.assert_close(
            resumed_model.prompt_tuning.prompt_embeddings.weight,
            model.prompt_tuning.prompt_embeddings.weight,
            atol=1e-5,
            rtol=0,
        )
    finally:
        resumed_model.close()


class StepCounter(TrainerCallback):
    def __init__(self):
        self.count = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.count += 1


def test_a_model_with_nothing_to_train_gets_a_clear_error(swarm, tmp_path):
    model = AutoDistributedModelForCausalLM.from_pretrained(DEMO_MODEL, initial_peers=swarm.initial_peers)
    try:
        with pytest.raises(ValueError, match="tuning_mode='ptune'"):
            Trainer(model=model, args=_training_args(tmp_path), train_dataset=[])
    finally:
        model.close()


def test_bad_tuning_options_are_refused_before_networking():
    with pytest.raises(ValueError, match="pre_seq_len"):
        AutoDistributedModelForCausalLM.from_pretrained(DEMO_MODEL, initial_peers=[], tuning_mode="ptune")
    with pytest.raises(ValueError, match="tuning_mode must be one of"):
        AutoDistributedModelForCausalLM.from_pretrained(DEMO_MODEL, initial_peers=[], tuning_mode="lora", pre_seq_len=4)


def test_a_classifier_learns_a_separable_toy_set(swarm, tokenizer, tmp_path):
    positive = ["import the module", "import os and sys", "import json", "import this module now"]
    negative = ["def main():", "def f(x): return x", "def run(self):", "def helper():"]
    texts, labels = positive + negative, [1] * len(positive) + [0] * len(negative)
    dataset = [{**tokenizer(text), "label": label} for text, label in zip(texts, labels)] * 4
    model = AutoDistributedModelForSequenceClassification.from_pretrained(
        DEMO_MODEL, initial_peers=swarm.initial_peers, num_labels=2, tuning_mode="ptune", pre_seq_len=4
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    try:
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        assert trainable == {"score.weight", "prompt_tuning.prompt_embeddings.weight"}
        args = _training_args(tmp_path, per_device_train_batch_size=4, num_train_epochs=3, save_strategy="no")
        trainer = Trainer(
            model=model, args=args, train_dataset=dataset, data_collator=DataCollatorWithPadding(tokenizer)
        )
        trainer.train()
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        assert not bool(batch.attention_mask.all())  # right padding is exercised
        with torch.no_grad():
            predictions = model(**batch).logits.argmax(dim=-1)
        assert predictions.tolist() == labels
    finally:
        model.close()


def test_tune_command_trains_prompts_that_the_library_loads(swarm, swarm_env, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": TARGET}) + "\n" for _ in range(6)))
    output = tmp_path / "tuned"
    command = [sys.executable, str(ROOT / "manage.py"), "tune", DEMO_MODEL, "--data", str(data)]
    command += ["--output", str(output), "--pre-seq-len", "4", "--initial-peers", *swarm.initial_peers]
    done = subprocess.run(
        command, env={**os.environ, **swarm_env}, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert [line for line in done.stdout.splitlines() if line.startswith("step ")][0].startswith("step 1/3: loss ")
    assert "Tuning: 100%" in done.stderr  # the progress bar
    saved = safetensors.torch.load_file(output / "model.safetensors")
    loaded = _ptune_model(swarm, str(output), tuning_mode=None, pre_seq_len=None)
    try:
        weight = loaded.prompt_tuning.prompt_embeddings.weight
        assert torch.equal(weight, saved["prompt_tuning.prompt_embeddings.weight"])
        assert loaded.prompt_tuning.pre_seq_len == 4
    finally:
        loaded.close()


@pytest.mark.parametrize(
    "content, message",
    [
        ("this is not json\n", "line 1: not JSON"),
        ("", "holds no examples"),
        ('{"text": "fine"}\n{"prompt": "no text here"}\n', "line 2: no 'text' text"),
        ('["a list"]\n', "line 1: expected a JSON object"),
    ],
    ids=["not-jsonl", "empty", "no-text-field", "not-an-object"],
)
def test_tune_command_refuses_bad_data_clearly(tmp_path, content, message):
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    with pytest.raises(CommandError, match=message):
        call_command("tune", DEMO_MODEL, "--data", str(data), "--output", str(tmp_path / "out"))


def test_the_readme_fine_tune_snippet_runs_as_written(swarm, tmp_path, monkeypatch):
    """Run from the repository root, as the README's paths are; its outputs go to a scratch folder."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Fine-tune", 1)[1]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    placeholder = '["/ip4/127.0.0.1/tcp/31337/p2p/Qm..."]'
    assert placeholder in snippet
    snippet = snippet.replace(placeholder, repr(list(swarm.initial_peers)))
    assert snippet.count('"./results') == 2
    snippet = snippet.replace('"./results', f'"{tmp_path}/results')
    monkeypatch.chdir(ROOT)
    namespace: dict = {}
    try:
        exec(compile(snippet, "README.md (Fine-tune)", "exec"), namespace)
        assert namespace["trainer"].state.global_step == 20  # (that the loss falls, the tests above show)
        assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["checkpoint-10", "checkpoint-20"]
        trained, tuned = namespace["model"], namespace["tuned"]
        assert torch.equal(tuned.prompt_tuning.prompt_embeddings.weight, trained.prompt_tuning.prompt_embeddings.weight)
    finally:
        for name in ("model", "tuned"):
            if name in namespace:
                namespace[name].close()
