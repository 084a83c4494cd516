"""The options of the contributor commands, shared by the console scripts and `manage.py`.

Defaults that depend on the deployment come from the environment (`SwarmEnv.from_environ`); the Django
commands pass the same values from their settings, which read the same variables.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_HOST_MADDRS = ("/ip4/0.0.0.0/tcp/0",)


class CliError(Exception):
    """A one-line reason a command cannot run; printed without a traceback."""


def _envlist(name: str, default: tuple[str, ...] = ()) -> list[str]:
    """A comma- or whitespace-separated list from the environment."""
    value = os.environ.get(name, "")
    return [item for item in value.replace(",", " ").split() if item] or list(default)


@dataclass(frozen=True)
class SwarmEnv:
    """Deployment defaults: the swarm to join and the addresses to listen on and announce."""

    initial_peers: list[str] = field(default_factory=list)
    host_maddrs: list[str] = field(default_factory=lambda: list(DEFAULT_HOST_MADDRS))
    announce_maddrs: list[str] = field(default_factory=list)
    health_url: str | None = None

    @classmethod
    def from_environ(cls) -> SwarmEnv:
        """SWARM_INITIAL_PEERS (or the file SWARM_INITIAL_PEERS_FILE), SWARM_HOST_MADDRS, SWARM_ANNOUNCE_MADDRS,
        SWARM_HEALTH_URL: the variables the site's settings read too."""
        peers = _envlist("SWARM_INITIAL_PEERS")
        peers_file = os.environ.get("SWARM_INITIAL_PEERS_FILE", "")
        if not peers and peers_file and Path(peers_file).exists():
            peers = Path(peers_file).read_text().split()
        return cls(
            initial_peers=peers,
            host_maddrs=_envlist("SWARM_HOST_MADDRS", DEFAULT_HOST_MADDRS),
            announce_maddrs=_envlist("SWARM_ANNOUNCE_MADDRS"),
            health_url=os.environ.get("SWARM_HEALTH_URL") or None,
        )


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """`--help` that appends `(default: ...)` to each option's help (lists space-separated; None, False: unset)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if not action.option_strings or "%(default)" in text or "default:" in text:
            return text
        if default is None or default is False or default is argparse.SUPPRESS or isinstance(action, _HELP_ACTIONS):
            return text
        if isinstance(default, list | tuple):
            default = " ".join(str(item) for item in default) or "none"
        return f"{text} (default: {str(default).replace('%', '%%')})"


_HELP_ACTIONS = (argparse._HelpAction, argparse._VersionAction)


# ----- value types: a bad value is refused by argparse, before anything starts -----


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
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number, not negative, got {text}")
    return value


def share(text: str) -> float:
    """A number from 0 to 1 (--balance-quality)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be from 0 to 1, got {text}")
    return value


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


# ----- the options -----

SERVER_DESCRIPTION = "Serve a span of a model's transformer blocks to the swarm (MODEL: local path or Hub repository)."
DHT_DESCRIPTION = "Run a bootstrap DHT peer for the swarm; prints its multiaddrs and runs until interrupted."


def add_network_arguments(parser: argparse.ArgumentParser, env: SwarmEnv, listen_example: str = "") -> None:
    """The peer's networking options, shared by the server and the bootstrap peer."""
    parser.add_argument(
        "--host-maddrs",
        nargs="+",
        default=list(env.host_maddrs),
        metavar="MADDR",
        help=f"multiaddrs to listen on{listen_example}; SWARM_HOST_MADDRS sets the default",
    )
    parser.add_argument(
        "--announce-maddrs",
        nargs="+",
        default=list(env.announce_maddrs),
        metavar="MADDR",
        help="multiaddrs others should dial, e.g. a public address (SWARM_ANNOUNCE_MADDRS; default: none)",
    )
    parser.add_argument(
        "--identity-path",
        help="private key file; makes the peer id stable across restarts (default: a new id each run)",
    )


def add_server_arguments(parser: argparse.ArgumentParser, env: SwarmEnv) -> None:
    """Every option of `swarm-server` / `manage.py runblockserver`."""
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
    parser.add_argument(
        "--quant-type",
        default="auto",
        choices=["auto", "none", "int8", "nf4"],
        help="quantize the blocks' linear layers with bitsandbytes to fit more blocks: int8 (LLM.int8()) or "
        "nf4 (4-bit, QLoRA); auto: nf4 on a GPU, none on the CPU",
    )
    add_network_arguments(parser, env)
    parser.add_argument(
        "--relay",
        choices=["auto", "always", "never"],
        default="auto",
        help="auto: when peers of the swarm cannot connect to this server (home NAT, firewall), serve through "
        "a relay among the initial peers; always: serve through a relay anyway; never: stop with advice instead, "
        "and dial no relayed peers",
    )
    parser.add_argument(
        "--relay-timeout",
        type=positive_seconds,
        default=60.0,
        help="seconds to wait for a relay to carry this server before stopping with advice",
    )
    parser.add_argument("--public-name", help="a name shown on the swarm's status page (default: none)")
    parser.add_argument("--dht-prefix", help="the model's prefix in the DHT (default: derived from MODEL)")
    parser.add_argument(
        "--throughput",
        type=throughput_value,
        default="auto",
        help="announced speed in requests/s, i.e. tokens/s of one-token inference steps through one block: "
        "auto (measured on this machine, cached) or a number",
    )
    parser.add_argument(
        "--bandwidth-mbps", type=float, default=100.0, help="uplink in Mbit/s, for the announced network_rps"
    )
    parser.add_argument("--max-length", type=positive_int, default=8192, help="token limit of one inference session")
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
    parser.add_argument(
        "--balance-quality",
        type=share,
        default=0.75,
        help="move to other blocks when that would make the swarm's weakest block faster than "
        "1/this times what it is now (0: never move; a span given with --block-indices never moves)",
    )
    parser.add_argument(
        "--balance-check-period",
        type=positive_seconds,
        default=120.0,
        help="mean seconds between checks of the swarm's balance (each jittered by up to half of it)",
    )


def add_dht_arguments(parser: argparse.ArgumentParser, env: SwarmEnv) -> None:
    """Every option of `swarm-dht` / `manage.py rundht`."""
    add_network_arguments(parser, env, ", e.g. /ip4/0.0.0.0/tcp/31337")
    parser.add_argument(
        "--initial-peers",
        nargs="*",
        default=[],
        metavar="MADDR",
        help="peers of an existing swarm to join (default: none, a new swarm)",
    )
    parser.add_argument(
        "--maddrs-file", help="also write the multiaddrs to this file, for other services (default: none)"
    )
    parser.add_argument(
        "--no-relay",
        dest="relay",
        action="store_false",
        help="do not relay for servers behind NAT (by default a bootstrap peer relays for them)",
    )
