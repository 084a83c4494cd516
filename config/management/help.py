"""`--help` of the contributor commands: every option shows its default."""

from __future__ import annotations

import argparse

from django.core.management.base import BaseCommand, DjangoHelpFormatter


class DefaultsHelpFormatter(DjangoHelpFormatter):
    """Appends `(default: ...)` to an option's help, lists written space-separated; None and False mean unset."""

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


class ContributorCommand(BaseCommand):
    """A command whose `--help` shows every option's default."""

    def create_parser(self, prog_name: str, subcommand: str, **kwargs):
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        parser.formatter_class = DefaultsHelpFormatter
        return parser


def add_network_arguments(parser: argparse.ArgumentParser, listen_example: str = "") -> None:
    """The peer's networking options, shared by runblockserver and rundht."""
    from django.conf import settings

    parser.add_argument(
        "--host-maddrs",
        nargs="+",
        default=settings.SWARM_HOST_MADDRS,
        metavar="MADDR",
        help=f"multiaddrs to listen on{listen_example}; SWARM_HOST_MADDRS sets the default",
    )
    parser.add_argument(
        "--announce-maddrs",
        nargs="+",
        default=settings.SWARM_ANNOUNCE_MADDRS,
        metavar="MADDR",
        help="multiaddrs others should dial, e.g. a public address (SWARM_ANNOUNCE_MADDRS; default: none)",
    )
    parser.add_argument(
        "--identity-path",
        help="private key file; makes the peer id stable across restarts (default: a new id each run)",
    )
