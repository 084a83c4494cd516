"""`--help` of the contributor commands: every option shows its default (the formatter lives in swarm.cli)."""

from __future__ import annotations

from django.core.management.base import BaseCommand, DjangoHelpFormatter

from swarm.cli import options as cli_options
from swarm.cli.options import SwarmEnv


class DefaultsHelpFormatter(cli_options.DefaultsHelpFormatter, DjangoHelpFormatter):
    """Django's help layout (its own options last) with every option's default."""


class ContributorCommand(BaseCommand):
    """A command whose `--help` shows every option's default."""

    def create_parser(self, prog_name: str, subcommand: str, **kwargs):
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        parser.formatter_class = DefaultsHelpFormatter
        return parser


def swarm_env() -> SwarmEnv:
    """The console scripts read these from the environment; the site's settings read the same variables."""
    from django.conf import settings

    return SwarmEnv(
        initial_peers=list(settings.SWARM_INITIAL_PEERS),
        host_maddrs=list(settings.SWARM_HOST_MADDRS),
        announce_maddrs=list(settings.SWARM_ANNOUNCE_MADDRS),
        health_url=settings.SWARM_HEALTH_URL or None,
    )
