"""`rundht` and `runblockserver` stop on SIGTERM and SIGINT, sent to the process or to its process group
(systemd, `timeout`, `docker stop`, Ctrl-C), within 20 s, leaving no DHT process or p2pd behind; a block
server announces OFFLINE on its way out."""

from __future__ import annotations

import signal
import subprocess
import time
import uuid

import psutil
import pytest

from swarm.data_structures import ServerState
from swarm.dht import create_dht, fetch_swarm
from swarm.local_swarm import SwarmProcess
from tests.conftest import DEMO_MODEL, start_swarm, still_running

pytestmark = pytest.mark.integration

STOP_WITHIN = 20.0  # seconds: what systemd's and docker's grace periods leave us, and the bound
CASES = [
    pytest.param(signal.SIGTERM, "group", id="TERM-to-group"),
    pytest.param(signal.SIGINT, "group", id="INT-to-group"),
    pytest.param(signal.SIGTERM, "process", id="TERM-to-process"),
    pytest.param(signal.SIGINT, "process", id="INT-to-process"),
]


@pytest.fixture(scope="module")
def swarm(make_swarm):
    swarm = start_swarm(make_swarm)  # a bootstrap peer only; each test starts what it stops
    yield swarm
    swarm.close()


def process_tree(process: SwarmProcess) -> list[psutil.Process]:
    """The command's process and everything it started (its DHT process and p2pd run in a session of their
    own, so the process group alone would miss them)."""
    main = psutil.Process(process.pid)
    return [main, *main.children(recursive=True)]


def stop_and_check(process: SwarmProcess, sig: signal.Signals, target: str) -> None:
    """Send `sig` to the command's process group or to its process alone; it must exit within STOP_WITHIN
    seconds, and so must everything it started."""
    tree = process_tree(process)
    assert any("p2pd" in " ".join(proc.cmdline()) for proc in tree[1:]), "no p2pd found under the command"
    if target == "group":
        process.signal(sig)
    else:
        process.process.send_signal(sig)
    try:
        process.process.wait(STOP_WITHIN)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{process.name} still runs {STOP_WITHIN:.0f} s after {sig.name}:\n{process.output()[-3000:]}")
    deadline = time.monotonic() + STOP_WITHIN  # its DHT process and p2pd follow it out
    while (left := still_running(tree)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"left running after {sig.name} to the {target}: {left}"
    assert "Traceback" not in process.output(), process.output()[-3000:]
    assert "the hard way" not in process.output(), process.output()[-3000:]


@pytest.mark.parametrize(("sig", "target"), CASES)
def test_rundht_stops(swarm, sig, target):
    dht = swarm.spawn_command("rundht-under-test", [*swarm.command, "rundht", "--host-maddrs", "/ip4/127.0.0.1/tcp/0"])
    try:
        dht.wait_for_line(lambda line: "is running" in line, timeout=120)
        stop_and_check(dht, sig, target)
    finally:
        dht.kill()


@pytest.mark.parametrize(("sig", "target"), CASES)
def test_runblockserver_stops_and_announces_offline(swarm, sig, target):
    prefix = f"signals-{uuid.uuid4().hex[:8]}-hf"  # a model of its own: no other server's record to confuse
    server = swarm.start_server(DEMO_MODEL, "--block-indices", "0:4", "--throughput", "1", "--dht-prefix", prefix)
    try:
        stop_and_check(server, sig, target)
    finally:
        server.kill()
    assert "Announced OFFLINE" in server.output(), server.output()[-3000:]
    reader = create_dht(swarm.initial_peers, client_mode=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        view = fetch_swarm(reader, prefix, 8)
    finally:
        reader.shutdown()
    assert server.peer_id in view.spans, f"no record of the server in the DHT: {view.spans}"
    assert view.spans[server.peer_id].state == ServerState.OFFLINE
    assert (view.spans[server.peer_id].start, view.spans[server.peer_id].end) == (0, 4)
