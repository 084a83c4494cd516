"""`manage.py rundht`: a bootstrap DHT peer that other peers join through.

The options and the work are `swarm-dht`'s (swarm/cli), so both take the same flags.
"""

from __future__ import annotations

from django.core.management.base import CommandError

from config.management.help import ContributorCommand, swarm_env
from swarm.cli.options import DHT_DESCRIPTION, CliError, add_dht_arguments
from swarm.cli.run_dht import run_dht


class Command(ContributorCommand):
    help = DHT_DESCRIPTION

    def add_arguments(self, parser) -> None:
        add_dht_arguments(parser, swarm_env())

    def handle(self, *args, **options) -> None:
        try:
            run_dht(options, self.stdout, self.stderr)
        except CliError as e:
            raise CommandError(str(e)) from None
