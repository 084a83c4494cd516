"""`swarm-server MODEL ...` (`python -m swarm.cli.run_server`): contribute a span of a model's blocks to the swarm."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from swarm.cli.options import SERVER_DESCRIPTION, CliError, DefaultsHelpFormatter, SwarmEnv, add_server_arguments


def run_server(options: dict[str, Any], env: SwarmEnv) -> None:
    """Check the options, load the blocks, serve until SIGINT/SIGTERM; a bad option or swarm raises CliError."""
    from swarm.server.server import BlockServer, ServerConfig, SwarmUnreachableError  # torch: after --help

    logging.getLogger("swarm").setLevel(logging.INFO)
    initial_peers = options["initial_peers"] or ([] if options["new_swarm"] else env.initial_peers)
    config = ServerConfig(
        model=options["model"],
        initial_peers=initial_peers,
        new_swarm=options["new_swarm"],
        block_indices=options["block_indices"],
        num_blocks=options["num_blocks"],
        device=options["device"],
        torch_dtype=options["torch_dtype"],
        quant_type=options["quant_type"],
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
        health_url=env.health_url,
        relay=options["relay"],
        relay_timeout=options["relay_timeout"],
        adapters=options["adapters"],
        balance_quality=options["balance_quality"],
        balance_check_period=options["balance_check_period"],
    )
    try:
        server = BlockServer(config)
    except (ValueError, OSError) as e:
        raise CliError(str(e)) from e
    try:
        server.run()
    except (SwarmUnreachableError, ValueError) as e:
        raise CliError(str(e)) from None


def build_parser(env: SwarmEnv, prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=SERVER_DESCRIPTION, formatter_class=DefaultsHelpFormatter)
    add_server_arguments(parser, env)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    env = SwarmEnv.from_environ()
    parser = build_parser(env, _prog())
    options = vars(parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("hivemind").setLevel(logging.WARNING)
    try:
        run_server(options, env)
    except CliError as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    except KeyboardInterrupt:
        sys.exit(130)


def _prog() -> str | None:
    """`swarm-...` as a console script; `python -m swarm.cli....` when run as a module."""
    return f"python -m {__spec__.name}" if __spec__ is not None and sys.argv[0].endswith(".py") else None


if __name__ == "__main__":
    main()
