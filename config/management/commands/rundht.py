"""`manage.py rundht`: a bootstrap DHT peer that other peers join through."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from django.core.management.base import CommandError

from config.management.help import ContributorCommand, add_network_arguments
from swarm.dht import create_dht, dht_start_error


class Command(ContributorCommand):
    help = "Run a bootstrap DHT peer for the swarm; prints its multiaddrs and runs until interrupted."

    def add_arguments(self, parser) -> None:
        add_network_arguments(parser, ", e.g. /ip4/0.0.0.0/tcp/31337")
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

    def handle(self, *args, **options) -> None:
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
            )
        except Exception as e:
            raise CommandError(dht_start_error(e, options["initial_peers"], options["host_maddrs"])) from None
        try:
            maddrs = [str(maddr) for maddr in dht.get_visible_maddrs()]
            self.stdout.write("\n".join(maddrs))
            self.stdout.flush()
            if options["maddrs_file"]:
                Path(options["maddrs_file"]).write_text("\n".join(maddrs) + "\n")
            self.stderr.write(f"DHT peer {dht.peer_id} is running; press Ctrl-C to stop")
            stop.wait()
        finally:
            dht.shutdown()
