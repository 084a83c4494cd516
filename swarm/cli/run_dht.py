"""`swarm-dht ...` (`python -m swarm.cli.run_dht`): a bootstrap DHT peer that other peers join through."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from swarm.cli.options import DHT_DESCRIPTION, CliError, DefaultsHelpFormatter, SwarmEnv, add_dht_arguments


def run_dht(options: dict[str, Any], out: TextIO, err: TextIO) -> None:
    """Print the peer's multiaddrs to `out` and run until SIGINT/SIGTERM; a peer that cannot start raises CliError."""
    from swarm.dht import RelaySettings, create_dht, dht_start_error  # hivemind: after --help
    from swarm.server.reachability import ReachabilityService

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if options["maddrs_file"]:
        Path(options["maddrs_file"]).unlink(missing_ok=True)  # never leave a stale address for others
    try:
        dht = create_dht(
            options["initial_peers"],
            client_mode=False,
            host_maddrs=options["host_maddrs"],
            announce_maddrs=options["announce_maddrs"],
            identity_path=options["identity_path"],
            # Others join through a bootstrap peer, so it is reachable: it relays for peers behind NAT.
            relay=RelaySettings(use_relay=options["relay"], public=True),
        )
    except Exception as e:
        raise CliError(dht_start_error(e, options["initial_peers"], options["host_maddrs"])) from None
    reachability = None
    try:
        reachability = ReachabilityService(dht)  # answers servers asking whether others can dial them
        maddrs = [str(maddr) for maddr in dht.get_visible_maddrs()]
        out.write("\n".join(maddrs) + "\n")
        out.flush()
        if options["maddrs_file"]:
            Path(options["maddrs_file"]).write_text("\n".join(maddrs) + "\n")
        err.write(f"DHT peer {dht.peer_id} is running; press Ctrl-C to stop\n")
        err.flush()
        stop.wait()
    finally:
        if reachability is not None:
            reachability.shutdown()
        dht.shutdown()


def build_parser(env: SwarmEnv, prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DHT_DESCRIPTION, formatter_class=DefaultsHelpFormatter)
    add_dht_arguments(parser, env)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser(SwarmEnv.from_environ(), _prog())
    options = vars(parser.parse_args(argv))
    try:
        run_dht(options, sys.stdout, sys.stderr)
    except CliError as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")


def _prog() -> str | None:
    """`swarm-...` as a console script; `python -m swarm.cli....` when run as a module."""
    return f"python -m {__spec__.name}" if __spec__ is not None and sys.argv[0].endswith(".py") else None


if __name__ == "__main__":
    main()
