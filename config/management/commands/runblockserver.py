"""`manage.py runblockserver MODEL`: contribute a span of a model's blocks to the swarm."""

from __future__ import annotations

import logging

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from swarm.server.server import BlockServer, ServerConfig, SwarmUnreachableError


def block_range(text: str) -> tuple[int, int]:
    start, sep, end = text.partition(":")
    if not sep or not start.isdigit() or not end.isdigit():
        raise ValueError("expected START:END, e.g. 0:4")
    return int(start), int(end)


def throughput_value(text: str) -> str | float:
    return text if text == "auto" else float(text)


class Command(BaseCommand):
    help = "Serve a span of a model's transformer blocks to the swarm (MODEL: local path or Hub repository)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("model", help="local checkpoint folder or Hugging Face repository name")
        peers = parser.add_mutually_exclusive_group()
        peers.add_argument("--initial-peers", nargs="+", default=None, help="multiaddrs of swarm peers")
        peers.add_argument("--new-swarm", action="store_true", help="start a new swarm instead of joining one")
        blocks = parser.add_mutually_exclusive_group()
        blocks.add_argument("--block-indices", type=block_range, help="serve blocks START:END (end exclusive)")
        blocks.add_argument("--num-blocks", type=int, help="serve this many blocks where the swarm needs them")
        parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
        parser.add_argument("--torch-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
        parser.add_argument("--host-maddrs", nargs="+", default=settings.SWARM_HOST_MADDRS)
        parser.add_argument("--announce-maddrs", nargs="+", default=settings.SWARM_ANNOUNCE_MADDRS)
        parser.add_argument("--identity-path", help="private key file; makes the peer id stable across restarts")
        parser.add_argument("--public-name", help="a name shown on the swarm's status page")
        parser.add_argument("--dht-prefix", help="override the model's DHT prefix")
        parser.add_argument("--throughput", type=throughput_value, default="auto", help="auto or requests/s")
        parser.add_argument("--bandwidth-mbps", type=float, default=100.0, help="uplink for network_rps")
        parser.add_argument("--max-length", type=int, default=8192, help="token limit of one inference session")
        parser.add_argument("--cache-tokens", type=int, default=16384, help="attention cache size in tokens")
        parser.add_argument("--update-period", type=float, default=120.0, help="seconds between announcements")
        parser.add_argument("--revision", help="Hub revision (branch, tag or commit)")
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
