"""The monitor's processes cannot be wedged or orphaned by its DHT: a SIGKILLed Celery worker (or pool process,
as at a task's hard time limit) leaves no DHT process or p2pd behind, a DHT that stops answering fails the
call instead of hanging it, and every task has time limits."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from monitor import conf
from monitor.crawl import DHTTimeoutError, FetchPart, dht_result, fetch_parts
from monitor.swarm_client import start_dht
from swarm.local_swarm import SwarmProcess
from tests.conftest import start_swarm, still_running

EXIT_WITHIN = 20.0  # seconds for orphaned processes to notice and exit (they poll every 0.5 s)


@pytest.fixture(scope="module")
def swarm(make_swarm):
    swarm = start_swarm(make_swarm)  # a bootstrap peer: the worker's DHT client joins through it
    yield swarm
    swarm.close()


def tree(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def wait_until_gone(processes: list[psutil.Process]) -> None:
    deadline = time.monotonic() + EXIT_WITHIN
    while (left := still_running(processes)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"still running {EXIT_WITHIN:.0f} s after the kill: {left}"


def is_p2pd(proc: psutil.Process) -> bool:
    return "p2pd" in Path(proc.cmdline()[0]).name


@pytest.fixture
def celery_worker(swarm, tmp_path):
    """A real worker (prefork pool of 2) on a broker folder of its own, and a Celery app that talks to it."""
    from celery import Celery

    broker = tmp_path / "celery-broker"
    app = Celery("monitor-process-tests")
    app.conf.update(
        broker_url="filesystem://",
        broker_transport_options={
            "data_folder_in": str(broker),
            "data_folder_out": str(broker),
            "control_folder": str(broker / "control"),
        },
        result_backend=f"file://{tmp_path / 'celery-results'}",
    )
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env.update(
        DEBUG="1",
        PYTHONUNBUFFERED="1",
        VAR_DIR=str(tmp_path),
        DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
        SWARM_INITIAL_PEERS=" ".join(swarm.initial_peers),
    )
    name = f"monitor-process-test-{uuid.uuid4().hex[:8]}@%h"
    argv = [str(Path(sys.executable).parent / "celery"), "-A", "config", "worker", "-l", "info", "-c", "2", "-n", name]
    argv += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    worker = SwarmProcess("celery-worker", argv, env, tmp_path / "worker.log")
    try:
        worker.wait_for_line(lambda line: " ready." in line, timeout=120)
        yield app, worker
    finally:
        worker.kill()


def run_a_crawl_part(app) -> None:
    """A task that joins the swarm (its pool process starts a DHT process and p2pd, kept for later tasks)."""
    part = FetchPart("process-test-hf", 4, 0, 4).to_json()
    result = app.send_task("monitor.tasks.crawl_part", args=[part]).get(timeout=120)
    assert result is not None


@pytest.mark.integration
@pytest.mark.parametrize("victim", ["worker-group", "main-process", "pool-process"])
def test_a_sigkilled_worker_leaves_no_dht_or_p2pd(celery_worker, victim):
    app, worker = celery_worker
    run_a_crawl_part(app)
    p2pds = [proc for proc in tree(worker.pid) if is_p2pd(proc)]
    assert p2pds, f"the worker started no p2pd: {still_running(tree(worker.pid))}"
    dhts = [proc.parent() for proc in p2pds]  # each p2pd's DHT process
    fork_servers = [dht.parent() for dht in dhts]  # which forked it (swarm.dht.OwnedDHT)
    owners = [server.parent() for server in fork_servers]  # the pool processes that started them
    assert all(owner.pid != worker.pid and owner.ppid() == worker.pid for owner in owners)
    if victim == "worker-group":  # the main process and its pool (the DHTs run in sessions of their own)
        os.killpg(worker.pid, signal.SIGKILL)
        worker.process.wait(EXIT_WITHIN)
    elif victim == "main-process":  # its pool processes notice and exit, and then their DHTs
        worker.process.send_signal(signal.SIGKILL)
        worker.process.wait(EXIT_WITHIN)
    else:  # what Celery does at a task's hard time limit, or the kernel when memory runs out
        for owner in owners:
            owner.send_signal(signal.SIGKILL)
    wait_until_gone([*owners, *fork_servers, *dhts, *p2pds])
    assert "Traceback" not in worker.output(), worker.output()[-3000:]


@pytest.mark.integration
def test_a_wedged_dht_fails_the_call_and_is_killed_on_shutdown(swarm):
    dht = start_dht(swarm.initial_peers)
    processes = [psutil.Process(dht.pid), *tree(dht.pid)]
    assert any(is_p2pd(proc) for proc in processes)
    os.killpg(dht.pid, signal.SIGSTOP)  # the DHT process and its p2pd stop answering
    try:
        with pytest.raises(DHTTimeoutError, match="did not answer within 1 s"):
            fetch_parts(dht, [FetchPart("process-test-hf", 4, 0, 4)], timeout=1.0)
    finally:
        dht.shutdown()  # a SIGTERM is never handled by a stopped process: shutdown must kill it
    wait_until_gone(processes)


def test_dht_result_times_out_with_a_clear_error():
    never = concurrent.futures.Future()
    with pytest.raises(DHTTimeoutError, match=r"the DHT did not answer within 0.01 s \(reading the model index\)"):
        dht_result(never, 0.01, "reading the model index")
    assert never.cancelled()


def test_every_monitor_task_has_soft_and_hard_time_limits(settings):
    from config.celery import app
    from monitor import tasks  # noqa: F401 (registers them)

    names = [name for name in app.tasks if name.startswith("monitor.")]
    assert len(names) == 4
    for name in names:
        task = app.tasks[name]
        assert (task.soft_time_limit, task.time_limit) == (conf.TASK_SOFT_TIME_LIMIT, conf.TASK_TIME_LIMIT), name
        assert 0 < task.soft_time_limit < task.time_limit
    assert conf.crawl_options().dht_timeout < conf.TASK_SOFT_TIME_LIMIT / 2  # a read and the pings fit in a task
    settings.MONITOR_TASK_SOFT_TIME_LIMIT, settings.MONITOR_TASK_TIME_LIMIT = 60, 30
    with pytest.raises(Exception, match="must be positive and less than MONITOR_TASK_TIME_LIMIT"):
        conf.task_time_limits()
