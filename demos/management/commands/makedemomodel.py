from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandParser

from demos.build import DEFAULT_OUTPUT, DEFAULT_TRAIN_SECONDS, build_demo_model
from demos.shapes import FAMILIES


class Command(BaseCommand):
    help = (
        "Train a tiny demo model on CPU and save it (Llama: swarm/demo_model/, Mixtral: swarm/demo_moe_model/,"
        " draft: swarm/demo_draft_model/)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--family",
            choices=FAMILIES,
            default="llama",
            help="llama: dense, trains the shared tokenizer; mixtral: sparse MoE, reuses the Llama demo's tokenizer;"
            " draft: a 3 MB assistant for speculative decoding, distilled from the Llama demo.",
        )
        parser.add_argument(
            "--output", type=Path, default=None, help="Folder to write the model to (default: the family's own)."
        )
        parser.add_argument(
            "--train-seconds",
            type=float,
            default=None,
            help="Wall-clock training budget (default 300; the draft's 900, what the shipped draft took, after a few"
            " minutes on the teacher's targets).",
        )
        parser.add_argument("--seed", type=int, default=0, help="Seed for initialisation and data order.")

    def handle(
        self, *args, family: str, output: Path | None, train_seconds: float | None, seed: int, **options
    ) -> None:
        output = output or DEFAULT_OUTPUT[family]
        train_seconds = DEFAULT_TRAIN_SECONDS[family] if train_seconds is None else train_seconds
        build_demo_model(output, family=family, train_seconds=train_seconds, seed=seed, log=self.stdout.write)
        self.stdout.write(self.style.SUCCESS(f"Demo model written to {output}"))
