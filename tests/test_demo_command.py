"""The README's first command, run as a new user would: everything starts, works, and stops cleanly.

Runs `make demo` in the background (embedded mode, then the full mode on this machine's Redis
and PostgreSQL), waits for the site, finds both demo models (the Llama and the sparse-MoE
Mixtral) healthy after the first crawl and offered by the chat page, chats one greedy reply
with each over the websocket, sends SIGINT, and checks that every process it started is gone
and that the block servers announced OFFLINE.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hivemind import DHT

from playground.client import PlaygroundClient
from swarm.local_swarm import free_port
from swarm.names import block_uid
from tests.conftest import ROOT, unavailable

pytestmark = pytest.mark.integration

# Chat model name (settings.PLAYGROUND_MODELS) → the DHT prefix its servers announce.
MODELS = {"demo": "demo_model-hf", "demo-moe": "demo_moe_model"}
STOP_SECONDS = 10  # Ctrl-C must stop the whole demo within this (bounded wait, not a benchmark)


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except OSError:
        return "?"


def get_json(url: str) -> dict:
    """The JSON answer; {} while the site answers 503 (no crawl has finished yet)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        if e.code == 503:
            return {}
        raise


@pytest.fixture
def postgres_database() -> Iterator[str]:
    psycopg = pytest.importorskip("psycopg")
    name = f"swarm_e2e_{uuid.uuid4().hex[:8]}"
    try:
        admin = psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True)
    except psycopg.OperationalError as e:
        unavailable(f"PostgreSQL is not reachable: {e}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"postgres://postgres@127.0.0.1:5432/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def redis_url() -> str:
    redis = pytest.importorskip("redis")
    url = "redis://127.0.0.1:6379/11"
    try:
        redis.Redis.from_url(url).flushdb()
    except redis.ConnectionError as e:
        unavailable(f"Redis is not reachable: {e}")
    return url


@pytest.mark.parametrize("mode", ["embedded", "full"])
def test_make_demo(mode, tmp_path, request):
    port, dht_port = free_port(), free_port()
    env = demo_env(tmp_path, port, dht_port)
    if mode == "full":
        env["REDIS_URL"] = redis_url()
        env["DATABASE_URL"] = request.getfixturevalue("postgres_database")

    demo = subprocess.Popen(
        ["make", "demo"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    lines: list[str] = []
    started: set[int] = set()
    dht = None
    try:
        deadline = time.monotonic() + 600  # the first run may install the environment
        peers = None
        for line in demo.stdout:
            lines.append(line)
            if "initial peers" in line:
                peers = line.split("initial peers", 1)[1].split()
            if "Press Ctrl-C" in line or time.monotonic() > deadline:
                break
        assert peers, "".join(lines)[-3000:]
        base = f"http://127.0.0.1:{port}"
        printed = "".join(lines)
        for prefix in MODELS.values():
            assert f"{base}/models/{prefix}/" in printed, printed[-3000:]
        for path in ("/", "/chat/", "/api/v1/state", "/metrics", "/v1"):  # every address the README names
            assert f"{base}{path}\n" in printed, (path, printed[-3000:])

        state = {}
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            state = get_json(f"{base}/api/v1/state")
            reports = {report["dht_prefix"]: report for report in state.get("model_reports", [])}
            if all(reports.get(prefix, {}).get("state") == "healthy" for prefix in MODELS.values()):
                break
            time.sleep(2)
        else:
            pytest.fail(f"the demo models never showed up healthy: {state}")

        with urllib.request.urlopen(f"{base}/chat/", timeout=10) as response:
            chat_page = response.read().decode()
        for name in MODELS:
            assert f'<option value="{name}">' in chat_page, name  # the model picker offers both

        for name in MODELS:
            reply = asyncio.run(chat_once(f"ws://127.0.0.1:{port}/api/v2/generate", name))
            assert reply["ok"] and reply["stop"] and reply["outputs"].strip(), (name, reply)

        # A DHT peer of our own keeps copies of the announcements after the swarm is gone.
        dht = DHT(initial_peers=peers, start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        deadline = time.monotonic() + 30  # until it can read every model's announcements (bounded wait)
        while not all(dht.get(block_uid(prefix, 0), latest=True) for prefix in MODELS.values()):
            assert time.monotonic() < deadline, "our DHT peer never saw the demo's announcements"
            time.sleep(0.2)
        started = descendants(demo.pid)
        assert len(started) >= 7, started  # make, demo, DHT, 3 servers, worker, beat, web (+ their children)
    finally:
        os.killpg(demo.pid, signal.SIGINT)  # what Ctrl-C in the terminal does: make and the demo get it
        rest, survivors, names = stop_within(demo, started, STOP_SECONDS)
        lines.append(rest)
        print("".join(lines)[-8000:])  # pytest shows it when the test fails: the demo's own tracebacks
        try:
            assert not survivors, f"processes left running: {names}"
            output = "".join(lines)
            assert "Stopped" in output and "make: ***" not in output, output[-3000:]
            if dht is not None:
                for prefix in MODELS.values():
                    for index in (0, 7):
                        found = dht.get(block_uid(prefix, index), latest=True)
                        states = {record.value[0] for record in found.value.values()} if found else set()
                        assert states == {0}, f"{prefix} block {index}: {states}"  # every server said OFFLINE
        finally:
            if dht is not None:
                dht.shutdown()


def stop_within(demo: subprocess.Popen, started: set[int], seconds: float) -> tuple[str, set[int], dict]:
    """Wait (bounded) for the signaled demo to exit; its remaining output, and the processes still alive.

    Fails if `make demo` has not exited after `seconds`: Ctrl-C must stop everything that fast."""
    try:
        rest, _ = demo.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(demo.pid, signal.SIGKILL)
        for pid in descendants(demo.pid):
            os.kill(pid, signal.SIGKILL)
        demo.communicate()
        pytest.fail(f"`make demo` was still running {seconds:g} s after Ctrl-C")
    finally:
        deadline = time.monotonic() + 15  # helpers like torch_shm_manager notice their clients left
        while any(alive(pid) for pid in started) and time.monotonic() < deadline:
            time.sleep(0.5)
        survivors = {pid for pid in started if alive(pid)}
        names = {pid: command_line(pid) for pid in survivors}
        for pid in survivors:
            os.kill(pid, signal.SIGKILL)
    return rest, survivors, names


def demo_env(tmp_path: Path, port: int, dht_port: int) -> dict[str, str]:
    env = {
        **os.environ,
        "VAR_DIR": str(tmp_path / "var"),
        "DEMO_ARGS": f"--port {port} --dht-port {dht_port}",
        "MONITOR_UPDATE_PERIOD": "5",
        "SWARM_CACHE_DIR": str(tmp_path / "cache"),
    }
    for name in ("DEBUG", "SECRET_KEY", "REDIS_URL", "DATABASE_URL", "DJANGO_SETTINGS_MODULE"):
        env.pop(name, None)
    return env


def test_ctrl_c_while_starting_stops_everything(tmp_path):
    """Ctrl-C before the swarm is up: every process started so far stops, fast, and make reports no error."""
    demo = subprocess.Popen(
        ["make", "demo"], cwd=ROOT, env=demo_env(tmp_path, free_port(), free_port()), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    lines: list[str] = []
    started: set[int] = set()
    try:
        for line in demo.stdout:  # the last block server is starting; Celery and the site come right after
            lines.append(line)
            if "Starting block server demo-moe" in line:
                break
        deadline = time.monotonic() + 60
        while len(started) < 8 and time.monotonic() < deadline:  # demo, DHT, 3 servers, worker, beat, web
            started = descendants(demo.pid)
            time.sleep(0.2)
        assert len(started) >= 8, ("".join(lines)[-3000:], [command_line(pid) for pid in started])
    finally:
        os.killpg(demo.pid, signal.SIGINT)
        rest, survivors, names = stop_within(demo, started, STOP_SECONDS)
        lines.append(rest)
    output = "".join(lines)
    assert not survivors, f"processes left running: {names}"
    assert "Press Ctrl-C" not in output and "Stopped" in output, output[-3000:]
    assert "make: ***" not in output and "Traceback" not in output, output[-3000:]


async def chat_once(url: str, model: str) -> dict:
    """The reply's last message, with `outputs` the whole streamed text (a last chunk may be just a space)."""
    client = await PlaygroundClient.connect(url)
    try:
        opened = await client.open_session(model, max_length=256)
        assert opened["ok"], opened
        last, outputs = {}, []
        async for message in client.generate(
            inputs="The function", max_new_tokens=8, do_sample=0, stop_sequence="<|eot_id|>", timeout=120
        ):
            last = message
            outputs.append(message.get("outputs", ""))
        return {**last, "outputs": "".join(outputs)}
    finally:
        await client.close()
