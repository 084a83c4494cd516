"""`manage.py runblockserver MODEL`: contribute a span of a model's blocks to the swarm."""

from __future__ import annotations

import argparse
import logging

from django.conf import settings
from django.core.management.base import CommandError

from config.management.help import ContributorCommand, add_network_arguments
from swarm.server.server import BlockServer, ServerConfig, SwarmUnreachableError


def block_range(text: str) -> tuple[int, int]:
    start, sep, end = text.partition(":")
    if not sep or not start.isdigit() or not end.isdigit():
        raise argparse.ArgumentTypeError(f"expected START:END, e.g. 0:4, got {text!r}")
    if int(start) >= int(end):
        raise argparse.ArgumentTypeError(f"{text}: START must be less than END (END is exclusive)")
    return int(start), int(end)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def throughput_value(text: str) -> str | float:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or a number of requests/s, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
    return value


class Command(ContributorCommand):
    help = "Serve a span of a model's transformer blocks to the swarm (MODEL: local path or Hub repository)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("model", help="local checkpoint folder or Hugging Face repository name")
        peers = parser.add_mutually_exclusive_group()
        peers.add_argument(
            "--initial-peers",
            nargs="+",
            default=None,
            metavar="MADDR",
            help="multiaddrs of swarm peers to join through (default: SWARM_INITIAL_PEERS)",
        )
        peers.add_argument("--new-swarm", action="store_true", help="start a new swarm instead of joining one")
        blocks = parser.add_mutually_exclusive_group()
        blocks.add_argument(
            "--block-indices",
            type=block_range,
            metavar="START:END",
            help="serve blocks START to END-1 (default: the blocks the swarm needs most)",
        )
        blocks.add_argument(
            "--num-blocks",
            type=positive_int,
            metavar="N",
            help="serve N blocks where the swarm needs them (default: as many as memory allows)",
        )
        parser.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda or cuda:N")
        parser.add_argument(
            "--torch-dtype",
            default="auto",
            choices=["auto", "float32", "bfloat16", "float16"],
            help="weights' dtype; auto: bfloat16 on a GPU, float32 on the CPU",
        )
        add_network_arguments(parser)
        parser.add_argument("--public-name", help="a name shown on the swarm's status page (default: none)")
        parser.add_argument("--dht-prefix", help="the model's prefix in the DHT (default: derived from MODEL)")
        parser.add_argument(
            "--throughput", type=throughput_value, default="auto", help="announced speed: auto (measured) or requests/s"
        )
        parser.add_argument(
            "--bandwidth-mbps", type=float, default=100.0, help="uplink in Mbit/s, for the announced network_rps"
        )
        parser.add_argument(
            "--max-length", type=positive_int, default=8192, help="token limit of one inference session"
        )
        parser.add_argument(
            "--cache-tokens", type=positive_int, default=16384, help="attention cache size in tokens (all sessions)"
        )
        parser.add_argument("--update-period", type=float, default=120.0, help="seconds between announcements")
        parser.add_argument("--revision", help="Hub revision: branch, tag or commit (default: main)")
        parser.add_argument("--token", help="Hub token for gated models (default: HF_TOKEN)")
        parser.add_argument(
            "--adapters",
            nargs="+",
            default=[],
            metavar="PATH",
            help="LoRA adapters (peft folders or Hub repositories) that requests may choose by this name",
        )

    def handle(self, *args, **options) -> None:
        logging.getLogger("swarm").setLevel(logging.INFO)
        initial_peers = options["initial_peers"] or ([] if options["new_swarm"] else settings.SWARM_INITIAL_PEERS)
        config = ServerConfig(
            model=options["model"],
            initial_peers=initial_peers,
            new_swarm=options["new_swarm"],
            block_indices=options["block_indices"],
            num_blocks=options["num_blocks"],
            device=options["device"],
            torch_dtype=options["torch_dtype"],
            host_maddrs=options["host_maddrs"],
            announce_maddrs=options["announce_maddrs"],
            identity_path=options["identity_path"],
            public_name=options["public_name"],
            dht_prefix=options["dht_prefix"],
            throughput=options["throughput"],
            bandwidth_mbps=options["bandwidth_mbps"],
            max_length=options["max_length"],
            cache_tokens=options["cache_tokens"],
            update_period=options["update_period"],
            revision=options["revision"],
            token=options["token"],
            health_url=settings.SWARM_HEALTH_URL or None,
            adapters=options["adapters"],
        )
        try:
            server = BlockServer(config)
        except (ValueError, OSError) as e:
            raise CommandError(str(e)) from e
        try:
            server.run()
        except (SwarmUnreachableError, ValueError) as e:
            raise CommandError(str(e)) from None
