from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandParser

from swarm.demo import DEMO_MODEL_PATH, build_demo_model


class Command(BaseCommand):
    help = "Train the tiny demo Llama model and tokenizer on CPU and save them (default: swarm/demo_model/)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--output", type=Path, default=DEMO_MODEL_PATH, help="Folder to write the model to.")
        parser.add_argument(
            "--train-seconds", type=float, default=300.0, help="Wall-clock training budget (default 300)."
        )
        parser.add_argument("--seed", type=int, default=0, help="Seed for initialisation and data order.")

    def handle(self, *args, output: Path, train_seconds: float, seed: int, **options) -> None:
        build_demo_model(output, train_seconds=train_seconds, seed=seed, log=self.stdout.write)
        self.stdout.write(self.style.SUCCESS(f"Demo model written to {output}"))
