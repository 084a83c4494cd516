"""`manage.py rundht`: a bootstrap DHT peer that other peers join through."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand

from swarm.dht import create_dht


class Command(BaseCommand):
    help = "Run a bootstrap DHT peer for the swarm; prints its multiaddrs and runs until interrupted."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--host-maddrs", nargs="+", default=settings.SWARM_HOST_MADDRS)
        parser.add_argument("--announce-maddrs", nargs="+", default=settings.SWARM_ANNOUNCE_MADDRS)
        parser.add_argument("--identity-path", help="private key file; makes the peer id stable across restarts")
        parser.add_argument("--initial-peers", nargs="*", default=[])
        parser.add_argument("--maddrs-file", help="also write the multiaddrs to this file (for other services)")

    def handle(self, *args, **options) -> None:
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        if options["maddrs_file"]:
            Path(options["maddrs_file"]).unlink(missing_ok=True)  # never leave a stale address for others
        dht = create_dht(
            options["initial_peers"],
            client_mode=False,
            host_maddrs=options["host_maddrs"],
            announce_maddrs=options["announce_maddrs"],
            identity_path=options["identity_path"],
        )
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
