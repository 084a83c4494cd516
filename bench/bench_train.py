"""Speed of a prompt-tuning Trainer step through two servers vs the same step on the local model.

    python bench/bench_train.py [--model PATH] [--rounds 7] [--steps 6] [--batch 2] [--tokens 64]

Both sides train the same thing with transformers' Trainer: `pre_seq_len` trainable prompt
embeddings in front of frozen blocks (`tuning_mode="ptune"`), the distributed model through two
servers (blocks split in halves), the local one in this process. Each round runs a few steps of
each, back to back in alternating order; a step's time is the median of its round's steps after
the first. Prints both step times and `ratio_train_step=<x>` (local step time / swarm step time:
the share of local speed the swarm keeps), the median over rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from transformers.modeling_outputs import CausalLMOutput  # noqa: E402

from swarm import AutoDistributedModelForCausalLM  # noqa: E402
from swarm.demo_models import DEMO_MODEL_PATH  # noqa: E402
from swarm.local_swarm import LocalSwarm  # noqa: E402
from swarm.models.registry import family_for  # noqa: E402

PRE_SEQ_LEN = 16


class LocalPromptTuned(nn.Module):
    """The local side: the same prompt tuning around a whole local model."""

    def __init__(self, model: nn.Module, pre_seq_len: int):
        super().__init__()
        self.model = model.requires_grad_(False)
        self.prompt_embeddings = nn.Embedding(pre_seq_len, model.config.hidden_size)
        nn.init.normal_(self.prompt_embeddings.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **kwargs) -> CausalLMOutput:
        embeddings = self.model.get_input_embeddings()(input_ids)
        prefix = self.prompt_embeddings.weight.unsqueeze(0).expand(input_ids.shape[0], -1, -1)
        logits = self.model(inputs_embeds=torch.cat([prefix, embeddings], dim=1)).logits[:, prefix.shape[1] :]
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return CausalLMOutput(loss=loss, logits=logits)


class StepTimer(TrainerCallback):
    def __init__(self):
        self.durations: list[float] = []
        self._began = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._began = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.durations.append(time.perf_counter() - self._began)


def step_seconds(model: nn.Module, dataset: list[dict], steps: int, batch: int, output_dir: str) -> float:
    """Median duration of a Trainer step (after the first) over `steps` steps."""
    timer = StepTimer()
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=1e-2,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        logging_strategy="no",
    )
    Trainer(model=model, args=args, train_dataset=dataset, callbacks=[timer]).train()
    return statistics.median(timer.durations[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEMO_MODEL_PATH))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)

    config = AutoConfig.from_pretrained(args.model)
    blocks = family_for(config).num_blocks(config)
    generator = torch.Generator().manual_seed(0)
    dataset = [
        {"input_ids": ids, "labels": ids}
        for ids in torch.randint(3, config.vocab_size, (args.batch * args.steps, args.tokens), generator=generator)
    ]
    local = LocalPromptTuned(AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32), PRE_SEQ_LEN)
    with tempfile.TemporaryDirectory() as scratch:
        env = {"DEBUG": "1", "SWARM_CACHE_DIR": scratch, "OMP_NUM_THREADS": "1"}
        with LocalSwarm([sys.executable, str(ROOT / "manage.py")], env=env) as swarm:
            swarm.start_dht()
            for span in (f"0:{blocks // 2}", f"{blocks // 2}:{blocks}"):
                swarm.start_server(args.model, "--block-indices", span)
            remote = AutoDistributedModelForCausalLM.from_pretrained(
                args.model, initial_peers=swarm.initial_peers, tuning_mode="ptune", pre_seq_len=PRE_SEQ_LEN
            )
            try:
                local_times, swarm_times, ratios = [], [], []
                for index in range(args.rounds):
                    order = [("local", local), ("swarm", remote)]
                    measured = {
                        name: step_seconds(model, dataset, args.steps, args.batch, scratch)
                        for name, model in (order if index % 2 == 0 else order[::-1])
                    }
                    local_times.append(measured["local"])
                    swarm_times.append(measured["swarm"])
                    ratios.append(measured["local"] / measured["swarm"])
            finally:
                remote.close()
    print(f"batch={args.batch} tokens={args.tokens} pre_seq_len={PRE_SEQ_LEN} blocks={blocks} (two servers)")
    print(f"local_step_ms={statistics.median(local_times) * 1000:.1f}")
    print(f"swarm_step_ms={statistics.median(swarm_times) * 1000:.1f}")
    print(f"ratio_train_step={statistics.median(ratios):.3f}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
