"""Shared fixtures: real swarms of processes on 127.0.0.1, always stopped by their fixture."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

from swarm.demo_models import DEMO_MODEL_PATH  # noqa: E402
from swarm.local_swarm import LocalSwarm  # noqa: E402

DEMO_MODEL = str(DEMO_MODEL_PATH)


@pytest.fixture(scope="session")
def swarm_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for child processes: development settings, a throughput cache shared by the run."""
    cache = tmp_path_factory.mktemp("swarm-cache")
    return {"DEBUG": "1", "SWARM_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="session")
def make_swarm(
    swarm_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[], LocalSwarm]]:
    """Factory of local swarms; every swarm made is closed at the end of the session at the latest."""
    swarms: list[LocalSwarm] = []

    def factory() -> LocalSwarm:
        logs = tmp_path_factory.mktemp("swarm-logs")
        swarm = LocalSwarm([sys.executable, str(ROOT / "manage.py")], env=swarm_env, log_dir=logs)
        swarms.append(swarm)
        return swarm

    yield factory
    for swarm in swarms:
        swarm.close()


def start_swarm(make_swarm, *spans: str, extra: tuple[str, ...] = ()) -> LocalSwarm:
    swarm = make_swarm()
    try:
        swarm.start_dht()
        for span in spans:
            swarm.start_server(DEMO_MODEL, "--block-indices", span, *extra)
    except BaseException:
        swarm.close()
        raise
    return swarm


@contextlib.contextmanager
def client_peer(swarm: LocalSwarm) -> Iterator[tuple]:
    """A P2P peer of the test's own (client-mode DHT) and the peer id of the swarm's last process."""
    from hivemind import DHT
    from hivemind.p2p import PeerID

    from swarm.client.event_loop import run_sync

    dht = DHT(initial_peers=swarm.initial_peers, client_mode=True, start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        p2p = run_sync(dht.replicate_p2p(), timeout=30)
        yield p2p, PeerID.from_base58(swarm.processes[-1].peer_id)
        run_sync(p2p.shutdown(), timeout=10)
    finally:
        dht.shutdown()


def unavailable(what: str) -> None:
    """A service, browser or tool a test needs is missing: a skip on a developer's machine, a failure
    in CI (`CI=true`), where a skipped test would pass without testing anything."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{what} (CI=true: a missing service is a failure, not a skip)")
    pytest.skip(what)


def still_running(processes: list) -> list[str]:
    """Those of the psutil processes that are still alive (not zombies), each as 'pid command line'."""
    import psutil

    left = []
    for proc in processes:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{proc.pid} {' '.join(proc.cmdline())[:160]}")
        except psutil.NoSuchProcess:
            pass
    return left
