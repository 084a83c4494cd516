"""Servers behind real NAT (network namespaces, nftables masquerade) serve through a relay.

The network: a public segment with the bootstrap peer (the relay) and a client host, and two home
networks, each a host behind a NAT router of its own with no port forwarding. Every process runs in
its namespace (`ip netns exec`); the test's own process only builds the network and reads results.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from swarm.local_swarm import LocalSwarm
from tests.conftest import DEMO_MODEL, ROOT, unavailable
from tests.netns import NetworkSetupError, PrivateInternet

PROMPT = "The Python language"
TOKENS = 12
MANAGE = [sys.executable, str(ROOT / "manage.py")]
RELAYED_MARK = "Behind NAT: serving through relay"


@pytest.fixture(scope="module")
def internet():
    try:
        network = PrivateInternet()
    except (NetworkSetupError, OSError) as e:
        unavailable(f"cannot build network namespaces: {e}")
    with network:
        yield network


@pytest.fixture(scope="module")
def expected_tokens() -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
    local = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
    inputs = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        outputs = local.generate(inputs, max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False)
    return outputs[0, inputs.shape[1] :].tolist()


def start_bootstrap(swarm: LocalSwarm, host, identity: str, *extra: str):
    """The bootstrap peer (and relay) on a fixed port and identity, so that a restart keeps its address."""
    argv = [*MANAGE, "rundht", "--host-maddrs", f"/ip4/{host.address}/tcp/31337", "--identity-path", identity]
    process = swarm.spawn_command("dht", host.command([*argv, *extra]))
    maddr = process.wait_for_line(lambda line: line.startswith("/ip4/") and "/p2p/" in line, timeout=60).strip()
    return process, maddr


def start_server(swarm: LocalSwarm, host, name: str, peer: str, *extra: str, wait: bool = True):
    argv = [*MANAGE, "runblockserver", DEMO_MODEL, "--initial-peers", peer, "--throughput", "10", *extra]
    process = swarm.spawn_command(name, host.command(argv))
    if wait:
        process.wait_until_online(120)
    return process


@pytest.fixture(scope="module")
def nat_swarm(internet, make_swarm, tmp_path_factory, swarm_env):
    """Bootstrap on the public side; server 0:4 behind one NAT, server 4:8 behind another."""
    boot, home1, home2 = internet.public_host("boot"), internet.home_host("home1"), internet.home_host("home2")
    swarm = make_swarm()
    identity = str(tmp_path_factory.mktemp("relay") / "bootstrap.key")
    dht, peer = start_bootstrap(swarm, boot, identity)
    servers = [
        start_server(swarm, home1, "home1", peer, "--block-indices", "0:4"),
        start_server(swarm, home2, "home2", peer, "--block-indices", "4:8"),
    ]
    yield {"swarm": swarm, "boot": boot, "peer": peer, "identity": identity, "dht": dht, "servers": servers}
    swarm.close()


def generate(host, peer: str, *extra: str, pause_after: int | None = None, on_pause=None) -> dict:
    """Greedy tokens and connections of a client process on `host`; at the pause, `on_pause()` runs first."""
    argv = [sys.executable, str(ROOT / "tests" / "swarm_generate.py"), DEMO_MODEL, peer, "--prompt", PROMPT]
    argv += ["--tokens", str(TOKENS), *extra]
    if pause_after:
        argv += ["--pause-after", str(pause_after)]
    process = subprocess.Popen(
        host.command(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if line.startswith("PAUSED"):
                on_pause()
                process.stdin.write("go\n")
                process.stdin.flush()
            if line.startswith("{"):
                return json.loads(line)
        raise AssertionError("the client printed no tokens:\n" + "".join(lines[-40:]))
    finally:
        process.kill()
        process.wait(10)


def processes_left(namespace: str, within: float) -> list[str]:
    """The command lines still running in `namespace` after up to `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
        if not pids or time.monotonic() > deadline:
            return [Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ") for pid in pids]
        time.sleep(0.2)


def test_servers_behind_nat_find_out_and_serve_through_the_relay(nat_swarm):
    for server in nat_swarm["servers"]:
        output = server.output()
        assert "Behind NAT or a firewall: peers could not connect to this server (0/1 could)" in output
        assert RELAYED_MARK in output and nat_swarm["peer"] in output
        assert "/p2p-circuit/p2p/" in output  # the address it announces


def test_a_chain_through_two_nats_is_exact(internet, nat_swarm, expected_tokens):
    client = internet.public_host("client")
    for options in ((), ("--petals",)):  # Petals' client defaults: no server-to-server push
        result = generate(client, nat_swarm["peer"], *options)
        assert result["tokens"] == expected_tokens
        for server in nat_swarm["servers"]:  # reached through the relay, not hole-punched to direct
            addrs = result["connections"][server.peer_id]
            assert addrs and all(addr.endswith("/p2p-circuit") for addr in addrs), addrs


def test_the_monitor_lists_relayed_servers_online(internet, nat_swarm, tmp_path):
    monitor = internet.public_host("monitor")
    env = {"VAR_DIR": str(tmp_path)}
    swarm = nat_swarm["swarm"]
    migrate = swarm.spawn_command("migrate", monitor.command([*MANAGE, "migrate", "--noinput"]), env=env)
    assert migrate.process.wait(120) == 0, migrate.output()
    crawl = swarm.spawn_command(
        "crawl", monitor.command([*MANAGE, "crawlswarm", "--initial-peers", nat_swarm["peer"]]), env=env
    )
    crawl.process.wait(120)
    output = crawl.output()
    for server in nat_swarm["servers"]:
        assert f"{server.peer_id} " in output and "online (reachable, through a relay)" in output, output
    assert output.count("(reachable, through a relay)") == 2, output


def test_a_chat_goes_on_after_the_relay_restarts(internet, nat_swarm, expected_tokens):
    """The relay restarts mid-chat (its circuits are gone): the servers reserve again, the client replays."""
    swarm, boot = nat_swarm["swarm"], nat_swarm["boot"]

    def restart_relay() -> None:
        nat_swarm["dht"].stop()
        nat_swarm["dht"], peer = start_bootstrap(swarm, boot, nat_swarm["identity"])
        assert peer == nat_swarm["peer"]
        for server in nat_swarm["servers"]:  # each rejoins within one relay check and a relay timeout
            server.wait_for_line(lambda line: "serving through relay" in line and line.endswith(" again"), timeout=60)

    client = internet.public_host("chat")
    assert generate(client, nat_swarm["peer"], pause_after=4, on_pause=restart_relay)["tokens"] == expected_tokens


def test_without_a_relay_a_server_behind_nat_stops_with_advice(internet, make_swarm, tmp_path):
    boot, home = internet.public_host("norelay"), internet.home_host("lonely")
    swarm = make_swarm()
    try:
        _, peer = start_bootstrap(swarm, boot, str(tmp_path / "key"), "--no-relay")
        server = start_server(swarm, home, "lonely", peer, "--relay-timeout", "10", wait=False)
        try:
            assert server.process.wait(90) == 1
        except subprocess.TimeoutExpired:
            raise AssertionError(server.output()) from None
        output = server.output()
        assert "no relay among the initial peers took it within 10 s" in output, output
        assert "--announce-maddrs /ip4/YOUR_PUBLIC_IP/tcp/31337" in output
        assert "Server is ONLINE" not in output
        assert processes_left(home.namespace, within=10) == []  # its DHT process and p2pd exit with it
    finally:
        swarm.close()
