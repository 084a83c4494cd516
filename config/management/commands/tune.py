"""`manage.py tune MODEL --data FILE.jsonl`: prompt-tune a model through the swarm without writing code."""

from __future__ import annotations

from django.conf import settings
from django.core.management.base import CommandError

from config.management.help import ContributorCommand
from swarm.client.ptune import TUNING_MODES
from swarm.tuning import TuningDataError, TuningJob, run_tuning


class Command(ContributorCommand):
    help = (
        "Train prompts for MODEL on the texts of a JSONL file, through the swarm's servers. The output folder "
        "loads with AutoDistributedModelForCausalLM.from_pretrained(OUTPUT, initial_peers=...)."
    )

    def add_arguments(self, parser) -> None:
        defaults = TuningJob(model="", data="", output="", initial_peers=())
        parser.add_argument("model", help="the base model: local checkpoint folder or Hugging Face repository name")
        parser.add_argument("--data", required=True, help="JSON Lines file, one object with a text field per line")
        parser.add_argument("--output", required=True, help="folder for checkpoints and the tuned prompts")
        parser.add_argument(
            "--initial-peers", nargs="+", default=None, help="multiaddrs of swarm peers (default: SWARM_INITIAL_PEERS)"
        )
        parser.add_argument(
            "--tuning-mode",
            choices=TUNING_MODES,
            default=defaults.tuning_mode,
            help="ptune: trainable prompts before the text; deep_ptune: also before every block",
        )
        parser.add_argument("--pre-seq-len", type=int, default=defaults.pre_seq_len, help="trainable prefix tokens")
        parser.add_argument("--text-field", default=defaults.text_field, help="the field of each line to train on")
        parser.add_argument("--epochs", type=float, default=defaults.epochs, help="passes over the data")
        parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="texts per training step")
        parser.add_argument(
            "--learning-rate", type=float, default=defaults.learning_rate, help="the optimizer's learning rate"
        )
        parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens, help="longer texts are cut")
        parser.add_argument("--save-steps", type=int, default=defaults.save_steps, help="checkpoint every N steps")
        parser.add_argument("--dht-prefix", help="the model's prefix in the DHT (default: derived from MODEL)")

    def handle(self, *args, **options) -> None:
        job = TuningJob(
            model=options["model"],
            data=options["data"],
            output=options["output"],
            initial_peers=options["initial_peers"] or settings.SWARM_INITIAL_PEERS,
            tuning_mode=options["tuning_mode"],
            pre_seq_len=options["pre_seq_len"],
            epochs=options["epochs"],
            batch_size=options["batch_size"],
            learning_rate=options["learning_rate"],
            max_tokens=options["max_tokens"],
            text_field=options["text_field"],
            save_steps=options["save_steps"],
            dht_prefix=options["dht_prefix"],
        )
        try:
            job.check()
        except (TuningDataError, ValueError) as e:
            raise CommandError(str(e)) from None
        if not job.initial_peers:
            raise CommandError("no swarm to join: pass --initial-peers or set SWARM_INITIAL_PEERS")
        output = run_tuning(job, report=lambda line: self.stdout.write(line))
        self.stdout.write(
            f"Tuned prompts saved to {output}; load them with "
            f"AutoDistributedModelForCausalLM.from_pretrained({str(output)!r}, initial_peers=[...])"
        )
