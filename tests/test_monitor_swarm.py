"""The monitor against a real swarm: a bootstrap DHT peer and block servers as processes on 127.0.0.1.

- `crawlswarm` records the servers, their spans, coverage and reachability;
- `/api/v1/is_reachable` pings a server now;
- a real Celery worker (filesystem broker; Redis when reachable) crawls through a fanned-out chord and
  keeps one DHT client per process;
- a crawl process killed in the middle of writing leaves no snapshot behind;
- headless Chromium loads the status page (which updates itself when a crawl lands) and a model page;
- servers leave, gracefully and not: online → offline / unreachable → absent, healthy → broken.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from django.core.management import call_command

from monitor import swarm_client
from monitor.crawl import CrawlOptions, run_crawl
from monitor.models import ModelStatus, ServerObservation
from monitor.snapshots import write_snapshot
from monitor.targets import ModelTarget
from swarm.local_swarm import ONLINE_MARK, SwarmProcess
from tests.conftest import DEMO_MODEL, ROOT, unavailable
from tests.test_monitor_snapshots import peer

# Every test uses the database, so that pytest-django (which runs database tests first) keeps this module's
# tests together and the swarm starts once.
pytestmark = [pytest.mark.integration, pytest.mark.django_db]

DEMO_PREFIX = "demo_model-hf"
SCENARIO = ModelTarget("monitor-scenario-hf", 8, "Scenario")  # the demo model under another prefix
REDIS_URL = "redis://127.0.0.1:6379/13"
PEER_ID_LINE = re.compile(r"peer id (\S+)")


class Swarm:
    def __init__(self, swarm, servers: dict[str, SwarmProcess]):
        self.local = swarm
        self.initial_peers = swarm.initial_peers
        self.servers = servers
        self.ids = {name: PEER_ID_LINE.search(process.output())[1] for name, process in servers.items()}


@pytest.fixture(scope="module")
def swarm(make_swarm):
    """Demo model: A 0:4 and B 4:8. Scenario model (stopped and killed by the last test): C 0:4, D 4:8."""
    local = make_swarm()
    try:
        local.start_dht()
        servers = {
            "A": local.start_server(
                DEMO_MODEL, "--block-indices", "0:4", "--throughput", "10", "--public-name", "alice", wait=False
            ),
            "B": local.start_server(DEMO_MODEL, "--block-indices", "4:8", "--throughput", "20", wait=False),
        }
        for name, blocks in (("C", "0:4"), ("D", "4:8")):
            servers[name] = local.start_server(
                DEMO_MODEL, "--block-indices", blocks, "--dht-prefix", SCENARIO.dht_prefix,
                "--update-period", "3", "--throughput", "5", wait=False,
            )  # fmt: skip
        for process in servers.values():
            process.wait_for_line(lambda line: ONLINE_MARK in line, timeout=240)
        yield Swarm(local, servers)
    finally:
        local.close()


@pytest.fixture(scope="module")
def migrated_db(tmp_path_factory, swarm) -> Path:
    """An empty, migrated SQLite database to copy for processes that share a database with the test."""
    path = tmp_path_factory.mktemp("monitor-db") / "template.sqlite3"
    env = {**os.environ, "DEBUG": "1", "DATABASE_URL": f"sqlite:///{path}"}
    env.pop("REDIS_URL", None)
    subprocess.run([sys.executable, str(ROOT / "manage.py"), "migrate", "-v0"], env=env, check=True, timeout=120)
    return path


@pytest.fixture
def shared_db(tmp_path, migrated_db) -> Path:
    path = tmp_path / "db.sqlite3"
    shutil.copy(migrated_db, path)
    return path


def child_env(swarm: Swarm, db: Path, var_dir: Path, **extra: str) -> dict[str, str]:
    """Settings for a child process (worker, web server, crawl) that shares `db` with the test."""
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env.update(
        DEBUG="1",
        PYTHONUNBUFFERED="1",
        DATABASE_URL=f"sqlite:///{db}",
        VAR_DIR=str(var_dir),
        SWARM_INITIAL_PEERS=" ".join(swarm.initial_peers),
        MONITOR_PING_CACHE_SECONDS="0",
        **extra,
    )
    return env


def query(db: Path, sql: str, *params) -> list[tuple]:
    with sqlite3.connect(db) as connection:
        return connection.execute(sql, params).fetchall()


def demo_rows(db: Path, snapshot_id: int) -> list[tuple]:
    return query(
        db,
        'SELECT peer_id, start, "end", state, reachable FROM monitor_serverobservation '
        "WHERE snapshot_id = ? AND dht_prefix = ? ORDER BY start",
        snapshot_id,
        DEMO_PREFIX,
    )


# ----- crawl command and is_reachable -----


def test_crawl_command_records_the_swarm(swarm, settings):
    settings.MONITOR_MODELS = f"{DEMO_PREFIX}:8::Demo model"
    out = io.StringIO()
    call_command("crawlswarm", "--initial-peers", *swarm.initial_peers, stdout=out)
    output = out.getvalue()
    assert f"{DEMO_PREFIX} (Demo model): healthy, 2 online, 8/8 blocks covered" in output

    status = ModelStatus.objects.get(dht_prefix=DEMO_PREFIX)
    assert status.healthy and status.snapshot.invalid_entries == 0
    rows = {row.peer_id: row for row in ServerObservation.objects.filter(model=status)}
    a, b = rows[swarm.ids["A"]], rows[swarm.ids["B"]]
    assert (a.start, a.end, a.display_state, a.reachable, a.throughput) == (0, 4, "online", True, 10.0)
    assert (b.start, b.end, b.display_state, b.reachable, b.throughput) == (4, 8, "online", True, 20.0)
    assert a.public_name == "alice" and a.version and a.torch_dtype and a.cache_tokens_left > 0
    assert a.rpc_latency is not None and 0 < a.rpc_latency < 5
    assert list(zip(status.coverage, status.coverage_throughput)) == [(1, 10.0)] * 4 + [(1, 20.0)] * 4
    assert [row.reachable for row in status.snapshot.bootstrap.all()] == [True]


@pytest.fixture
def site_dht(swarm, settings):
    """The web process's DHT client (started by the first request that needs it), stopped afterwards."""
    settings.SWARM_INITIAL_PEERS = swarm.initial_peers
    yield
    swarm_client.shutdown()


def test_is_reachable_pings_the_peer_now(swarm, site_dht, client):
    reachable = client.get(f"/api/v1/is_reachable/{swarm.ids['A']}").json()
    assert reachable == {"success": True, "message": None, "your_ip": "127.0.0.1"}
    nobody = client.get(f"/api/v1/is_reachable/{peer('nobody')}").json()
    assert nobody["success"] is False and nobody["message"]


# ----- a crash in the middle of writing -----

CRASHING_CRAWL = """
import os, signal, sys
import django
django.setup()
from django.core.management import call_command
from django.db import connection

def crash_while_writing(execute, sql, params, many, context):
    if sql.startswith("INSERT") and "monitor_serverobservation" in sql:
        print("server rows inserted", flush=True)
    if sql.startswith("INSERT") and "monitor_bootstrapobservation" in sql:
        print("dying before the bootstrap rows", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return execute(sql, params, many, context)

with connection.execute_wrapper(crash_while_writing):
    call_command("crawlswarm")
"""


def test_a_crawl_killed_while_writing_leaves_no_snapshot(swarm, shared_db, tmp_path):
    env = child_env(swarm, shared_db, tmp_path, DJANGO_SETTINGS_MODULE="config.settings")
    crashed = subprocess.run(
        [sys.executable, "-c", CRASHING_CRAWL], env=env, cwd=ROOT, capture_output=True, text=True, timeout=180
    )
    assert crashed.returncode == -9, crashed.stdout + crashed.stderr
    assert "server rows inserted" in crashed.stdout and "dying before the bootstrap rows" in crashed.stdout
    for table in ("snapshot", "modelstatus", "serverobservation", "bootstrapobservation"):
        assert query(shared_db, f"SELECT COUNT(*) FROM monitor_{table}") == [(0,)], table

    # The database is intact: the next crawl writes a whole snapshot.
    subprocess.run([sys.executable, "manage.py", "crawlswarm"], env=env, cwd=ROOT, check=True, timeout=180)
    (snapshot_id,) = query(shared_db, "SELECT id FROM monitor_snapshot")[0]
    assert [row[:3] for row in demo_rows(shared_db, snapshot_id)] == [
        (swarm.ids["A"], 0, 4),
        (swarm.ids["B"], 4, 8),
    ]


# ----- a real Celery worker -----


def _redis_reachable() -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


@pytest.fixture(params=["filesystem", "redis"])
def celery_worker(request, swarm, shared_db, tmp_path):
    """A worker process on its own broker (a temporary folder, or a Redis database), and a Celery app
    in this process that talks to it."""
    from celery import Celery

    extra = {"MONITOR_BLOCKS_PER_TASK": "4"}  # the demo model's 8 blocks crawl as 2 parts
    app = Celery("monitor-tests")
    if request.param == "redis":
        if not _redis_reachable():
            unavailable("Redis is not reachable at 127.0.0.1:6379")
        extra["REDIS_URL"] = REDIS_URL
        app.conf.update(broker_url=REDIS_URL, result_backend=REDIS_URL)
    else:
        broker = tmp_path / "celery-broker"
        app.conf.update(
            broker_url="filesystem://",
            broker_transport_options={
                "data_folder_in": str(broker),
                "data_folder_out": str(broker),
                "control_folder": str(broker / "control"),
            },
            result_backend=f"file://{tmp_path / 'celery-results'}",
        )
    env = child_env(swarm, shared_db, tmp_path, **extra)
    name = f"monitor-test-{uuid.uuid4().hex[:8]}@%h"
    argv = [str(Path(sys.executable).parent / "celery"), "-A", "config", "worker", "-l", "info", "-c", "2", "-n", name]
    argv += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    worker = SwarmProcess("celery-worker", argv, env, tmp_path / "worker.log")
    try:
        worker.wait_for_line(lambda line: " ready." in line, timeout=120)
        yield app, worker
    finally:
        # Its tasks are done; a warm shutdown would spend ~7 s in Celery itself. The worker and its pool share
        # one process group and go at once; their DHT processes and p2p daemons follow (swarm.dht.OwnedDHT).
        worker.kill()
        if request.param == "redis":
            with app.connection_for_write() as connection:
                connection.default_channel.client.delete("celery")  # leave no queued task behind


def _share_the_workers_cache(settings, kind: str, var_dir: Path) -> None:
    """This process uses the cache the worker uses (Redis, or the embedded mode's folder under its VAR_DIR)."""
    if kind == "redis":
        settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}}
    else:
        cache = {"BACKEND": "django.core.cache.backends.filebased.FileBasedCache", "LOCATION": str(var_dir / "cache")}
        settings.CACHES = {"default": cache}


def test_a_celery_worker_crawls_through_a_fanned_out_chord(
    celery_worker, swarm, shared_db, request, settings, tmp_path
):
    from monitor import tasks

    app, worker = celery_worker
    # A beat tick while a crawl holds the lock starts no second crawl.
    _share_the_workers_cache(settings, request.node.callspec.params["celery_worker"], tmp_path)
    held = tasks.acquire_crawl_lock(seconds=120)
    assert held
    try:
        assert app.send_task("monitor.tasks.crawl_swarm").get(timeout=120) is None
        assert "The previous crawl has not finished: this one is skipped" in worker.output()
    finally:
        tasks.release_crawl_lock(held)

    summaries = []
    for _ in range(2):
        save_id = app.send_task("monitor.tasks.crawl_swarm").get(timeout=120)
        summaries.append(app.AsyncResult(save_id).get(timeout=120))
    for summary in summaries:
        assert summary["healthy"][DEMO_PREFIX] is True
        assert summary["parts"] == 2 * len(summary["healthy"])  # each 8-block model in 2 parts

    snapshot_id = summaries[-1]["snapshot"]
    rows = demo_rows(shared_db, snapshot_id)
    assert rows == [(swarm.ids["A"], 0, 4, 2, 1), (swarm.ids["B"], 4, 8, 2, 1)]  # online, reachable
    coverage = query(
        shared_db,
        "SELECT coverage FROM monitor_modelstatus WHERE snapshot_id = ? AND dht_prefix = ?",
        snapshot_id,
        DEMO_PREFIX,
    )
    assert [json.loads(value) for (value,) in coverage] == [[1] * 8]
    # Six tasks ran in two pool processes; each joined the swarm once and kept its DHT client.
    joins = worker.output().count("Joining the swarm")
    assert 1 <= joins <= 2, worker.output()[-3000:]
    freed = tasks.acquire_crawl_lock(seconds=120)  # each save released its crawl's lock
    assert freed
    tasks.release_crawl_lock(freed)


# ----- the pages in a real browser -----


@pytest.fixture
def web_server(swarm, shared_db, tmp_path):
    env = child_env(swarm, shared_db, tmp_path, MONITOR_PUSH_POLL_SECONDS="0.5", ALLOWED_HOSTS="127.0.0.1 localhost")
    daphne = str(Path(sys.executable).parent / "daphne")
    argv = [daphne, "-e", "tcp:port=0:interface=127.0.0.1", "config.asgi:application"]
    server = SwarmProcess("daphne", argv, env, tmp_path / "daphne.log")
    try:
        line = server.wait_for_line(lambda line: "Listening on TCP address" in line, timeout=120)
        yield f"http://127.0.0.1:{line.rsplit(':', 1)[1].strip()}", env
    finally:
        server.stop(timeout=15)


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    if not Path("/usr/bin/chromium").exists():
        unavailable("Chromium is not installed at /usr/bin/chromium")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.mark.browser
def test_status_and_model_pages_in_a_browser(swarm, web_server, browser, shared_db):
    base, env = web_server

    def crawl() -> None:
        subprocess.run([sys.executable, "manage.py", "crawlswarm"], env=env, cwd=ROOT, check=True, timeout=180)

    crawl()
    page = browser.new_page()
    page.goto(base + "/")
    rows = page.locator(f'section[data-dht-prefix="{DEMO_PREFIX}"] tr.server')
    rows.first.wait_for()
    assert rows.count() == 2
    assert page.locator(f'tr.server.online[data-peer-id="{swarm.ids["A"]}"]').inner_text().count("alice") == 1
    assert page.locator(".legend .swatch").count() == 5  # every display state

    # A new crawl lands: the page swaps in the new state without reloading.
    page.evaluate("window.stillTheSamePage = true")
    first = page.locator("[data-snapshot-id]").get_attribute("data-snapshot-id")
    crawl()
    page.wait_for_function(
        "id => document.querySelector('[data-snapshot-id]').dataset.snapshotId !== id", arg=first, timeout=30_000
    )
    assert page.evaluate("window.stillTheSamePage") is True
    assert page.locator(f'section[data-dht-prefix="{DEMO_PREFIX}"] tr.server').count() == 2

    page.goto(f"{base}/models/{DEMO_PREFIX}/")
    page.locator('[data-chart="coverage"] .main-svg').first.wait_for(timeout=30_000)
    assert page.locator('[data-chart="coverage"] .hm').count() >= 1  # the heatmap layer
    page.locator('[data-chart="availability"] .main-svg').first.wait_for()
    page.click('a[data-range="1h"]')
    page.wait_for_selector('a[data-range="1h"].selected')
    assert page.locator(".js-plotly-plot").count() == 5
    page.close()


# ----- servers leave (this test stops its own servers: keep it last) -----


def _crawl(dht, swarm) -> tuple[ModelStatus, dict[str, ServerObservation]]:
    options = CrawlOptions(ping_timeout=3.0)
    snapshot = write_snapshot(run_crawl(dht, [SCENARIO], swarm.initial_peers, options))
    status = snapshot.models.get(dht_prefix=SCENARIO.dht_prefix)
    return status, {row.peer_id: row for row in status.servers.all()}


def _coverage(status: ModelStatus) -> list[int]:
    return status.coverage


def test_servers_leaving_are_followed_until_they_are_gone(swarm):
    c, d = swarm.ids["C"], swarm.ids["D"]
    dht = swarm_client.start_dht(swarm.initial_peers)
    try:
        status, rows = _crawl(dht, swarm)
        assert status.healthy and _coverage(status) == [1] * 8
        assert {p: r.display_state for p, r in rows.items()} == {c: "online", d: "online"}

        swarm.servers["C"].stop()  # graceful: announces OFFLINE before it exits
        status, rows = _crawl(dht, swarm)
        assert not status.healthy and _coverage(status) == [0] * 4 + [1] * 4
        assert (rows[c].display_state, rows[c].start, rows[c].end) == ("offline", 0, 4)
        assert rows[d].display_state == "online"

        swarm.servers["D"].kill()  # the machine dies: its ONLINE announcement lingers until it expires
        status, rows = _crawl(dht, swarm)
        assert rows[d].state == 2 and rows[d].display_state == "unreachable"
        assert rows[d].reachable is False and rows[d].error
        assert _coverage(status) == [0] * 8

        deadline = time.monotonic() + 60
        while rows and time.monotonic() < deadline:
            time.sleep(2)
            status, rows = _crawl(dht, swarm)
        assert rows == {}, "expired announcements are no longer read"
        assert not status.healthy and _coverage(status) == [0] * 8
    finally:
        dht.shutdown()
