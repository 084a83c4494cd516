"""The contributor commands run with nothing set, check their options before joining, and say what is wrong."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from config.management.commands import runblockserver, rundht, tune
from config.management.help import DefaultsHelpFormatter
from tests.conftest import DEMO_MODEL, ROOT

UNREACHABLE = "/ip4/127.0.0.1/tcp/9/p2p/QmTuNdkCwxHiJvv4hWmFaVYmNMMq72tZJNed1uB2TwPn8v"
DJANGO_OPTIONS = {"help", "version", "verbosity", "settings", "pythonpath", "traceback", "no_color", "force_color",
                  "skip_checks"}  # fmt: skip


def manage(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    """`python manage.py ARGS` with a bare environment: no DEBUG, SECRET_KEY, DATABASE_URL or settings module."""
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("command", ["runblockserver", "rundht", "tune"])
def test_contributor_commands_need_no_settings(command, tmp_path):
    result = manage(command, "--help", cwd=tmp_path)  # from any folder, as after a plain install
    assert result.returncode == 0, result.stderr
    assert f"usage: manage.py {command}" in result.stdout
    assert ("--data" if command == "tune" else "--host-maddrs") in result.stdout
    assert "SECRET_KEY" not in result.stderr


def test_the_site_still_refuses_without_a_secret_key():
    result = manage("check", "--deploy")
    assert result.returncode != 0
    assert "SECRET_KEY must be set" in result.stderr


@pytest.mark.parametrize("module", [runblockserver, rundht, tune])
def test_help_shows_every_option_with_its_default(module):
    parser = module.Command().create_parser("manage.py", module.__name__.rsplit(".", 1)[-1])
    formatter = DefaultsHelpFormatter("manage.py")
    for action in parser._actions:
        if not action.option_strings or action.dest in DJANGO_OPTIONS:
            continue
        assert action.help, f"{action.option_strings[0]} has no description"
        if action.const is not True and not action.required:  # flags (store_true) are off unless given
            assert "default" in formatter._get_help_string(action), f"{action.option_strings[0]} shows no default"
    assert "(default: /ip4/0.0.0.0/tcp/0)" in " ".join(parser.format_help().split()) or module is tune


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--block-indices", "5:2"], "START must be less than END"),
        (["--block-indices", "3:3"], "START must be less than END"),
        (["--block-indices", "4:12"], "must lie within 0:8"),
        (["--block-indices", "four"], "expected START:END"),
        (["--num-blocks", "0"], "--num-blocks: must be at least 1"),
        (["--num-blocks", "-2"], "--num-blocks: must be at least 1"),
        (["--throughput", "fast"], "expected auto or a number"),
    ],
)
def test_runblockserver_checks_its_options_before_joining(args, message):
    with pytest.raises(CommandError, match=message):
        call_command("runblockserver", DEMO_MODEL, "--new-swarm", *args)


@pytest.mark.parametrize("path", ["./no/such/model", "/no/such/model", "~/no-such-model", f"{DEMO_MODEL}-missing"])
def test_a_missing_local_model_is_named(path):
    with pytest.raises(CommandError, match="does not exist") as error:
        call_command("runblockserver", path, "--new-swarm")
    assert "Repo id" not in str(error.value)


def test_block_indices_out_of_range_fail_before_networking():
    result = manage("runblockserver", DEMO_MODEL, "--new-swarm", "--block-indices", "4:12")
    assert result.returncode == 1
    assert "must lie within 0:8" in result.stderr
    assert "Traceback" not in result.stderr and "OFFLINE" not in result.stderr and "Server peer" not in result.stderr


def test_rundht_with_unreachable_peers_says_so_in_one_line():
    result = manage("rundht", "--initial-peers", UNREACHABLE, "--host-maddrs", "/ip4/127.0.0.1/tcp/0")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("CommandError: could not join the swarm through /ip4/127.0.0.1/tcp/9")


@pytest.mark.parametrize("command", [["rundht"], ["runblockserver", DEMO_MODEL, "--new-swarm"]])
def test_a_port_in_use_is_an_error(command):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = manage(*command, "--host-maddrs", f"/ip4/127.0.0.1/tcp/{port}")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"--host-maddrs /ip4/127.0.0.1/tcp/{port}: the address is already in use" in result.stderr
