"""`manage.py crawlswarm`: one crawl, now, in this process; prints what it found."""

from __future__ import annotations

import logging

from django.core.management.base import BaseCommand, CommandError

from monitor import conf
from monitor.crawl import PingCache, run_crawl
from monitor.snapshots import summarize, write_snapshot
from monitor.swarm_client import start_dht
from monitor.tasks import known_good

logger = logging.getLogger(__name__)

MAX_LISTED_SERVERS = 50


class Command(BaseCommand):
    help = "Crawl the swarm once, synchronously, store a snapshot and print a summary."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--initial-peers", nargs="+", help="multiaddrs to join through (default: settings)")
        parser.add_argument("--no-ping", action="store_true", help="skip reachability pings")

    def handle(self, *args, **options) -> None:
        peers = options["initial_peers"] or conf.initial_peers()
        if not peers:
            raise CommandError("no swarm to crawl: give --initial-peers or set SWARM_INITIAL_PEERS")
        dht = start_dht(peers)
        try:
            crawl_options = conf.crawl_options(ping=not options["no_ping"])
            # Servers earlier crawls reached go first, as in the scheduled crawls: a flood cannot push them out.
            result = run_crawl(dht, conf.configured_models(), peers, crawl_options, PingCache(0), known_good())
        finally:
            dht.shutdown()
        snapshot = write_snapshot(result)
        self._print(summarize(snapshot))

    def _print(self, summary: dict) -> None:
        write = self.stdout.write
        write(
            f"Snapshot {summary['id']} at {summary['created_at']}: {len(summary['models'])} models, "
            f"{summary['num_servers']} servers, {summary['invalid_entries']} invalid entries, "
            f"crawl took {summary['duration']:.2f} s"
        )
        for model in summary["models"]:
            states: dict[str, int] = {}
            for server in model["servers"]:
                states[server["display_state"]] = states.get(server["display_state"], 0) + 1
            covered = sum(1 for count in model["coverage"] if count)
            counts = ", ".join(f"{n} {state}" for state, n in sorted(states.items())) or "no servers"
            write(
                f"  {model['dht_prefix']} ({model['name']}): {'healthy' if model['healthy'] else 'broken'}, "
                f"{counts}, {covered}/{model['num_blocks']} blocks covered"
            )
            for server in model["servers"][:MAX_LISTED_SERVERS]:
                reach = {True: "reachable", False: f"unreachable: {server['error']}", None: "not pinged"}
                connection = {True: ", through a relay", False: ", direct", None: ""}[server["using_relay"]]
                write(
                    f"    {server['peer_id']} {server['start']}:{server['end']} {server['state']} "
                    f"({reach[server['reachable']]}{connection})"
                )
            if len(model["servers"]) > MAX_LISTED_SERVERS:
                write(f"    ... and {len(model['servers']) - MAX_LISTED_SERVERS} more")
        for peer in summary["bootstrap"]:
            write(f"  bootstrap {peer['peer_id']}: {'online' if peer['reachable'] else 'unreachable'}")
