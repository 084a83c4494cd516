"""`manage.py runblockserver MODEL`: contribute a span of a model's blocks to the swarm.

The options and the work are `swarm-server`'s (swarm/cli), so both take the same flags.
"""

from __future__ import annotations

from django.core.management.base import CommandError

from config.management.help import ContributorCommand, swarm_env
from swarm.cli.options import SERVER_DESCRIPTION, CliError, add_server_arguments
from swarm.cli.run_server import run_server


class Command(ContributorCommand):
    help = SERVER_DESCRIPTION

    def add_arguments(self, parser) -> None:
        add_server_arguments(parser, swarm_env())

    def handle(self, *args, **options) -> None:
        try:
            run_server(options, swarm_env())
        except CliError as e:
            raise CommandError(str(e)) from None
