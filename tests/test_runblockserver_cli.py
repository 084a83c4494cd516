"""`manage.py runblockserver` explains what is wrong instead of crashing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import DEMO_MODEL, ROOT

UNREACHABLE = "/ip4/127.0.0.1/tcp/9/p2p/QmTuNdkCwxHiJvv4hWmFaVYmNMMq72tZJNed1uB2TwPn8v"


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), "runblockserver", *args],
        env={**env, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.integration
def test_unreachable_initial_peers(swarm_env):
    result = run(DEMO_MODEL, "--initial-peers", UNREACHABLE, "--host-maddrs", "/ip4/127.0.0.1/tcp/0", env=swarm_env)
    assert result.returncode != 0
    assert "could not join the swarm through" in result.stderr and "Check the addresses" in result.stderr


def test_needs_peers_or_new_swarm(swarm_env):
    result = run(DEMO_MODEL, env=swarm_env)
    assert result.returncode != 0
    assert "--initial-peers" in result.stderr and "--new-swarm" in result.stderr


def test_block_indices_must_fit_the_model(swarm_env):
    result = run(DEMO_MODEL, "--new-swarm", "--block-indices", "4:12", "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
                 env=swarm_env)  # fmt: skip
    assert result.returncode != 0
    assert "within 0:8" in result.stderr


def test_block_indices_syntax(swarm_env):
    result = run(DEMO_MODEL, "--new-swarm", "--block-indices", "four", env=swarm_env)
    assert result.returncode != 0 and "--block-indices" in result.stderr
