"""The status report is built once per snapshot and process, the status page lists a bounded number of
servers per model, one staleness rule serves every page, and crawls never overlap (the crawl lock)."""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import subprocess
import sys
import time

import pytest
from django.urls import reverse

from monitor import conf, reports, tasks
from monitor.models import Snapshot
from monitor.reports import REPORTS, current_report
from monitor.snapshots import write_snapshot
from swarm.data_structures import ServerState
from tests.conftest import ROOT
from tests.test_monitor_pages import _rows
from tests.test_monitor_snapshots import MODEL, REACHABLE, UNREACHABLE, crawl_result, peer, span


@pytest.fixture(autouse=True)
def fresh_reports():
    REPORTS.clear()
    yield
    REPORTS.clear()


@pytest.fixture
def shared_cache(settings, tmp_path):
    """The embedded mode's cache (a folder every process of the site shares), here a fresh one."""
    settings.CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.filebased.FileBasedCache", "LOCATION": str(tmp_path)}
    }


def _write(*servers, started_at: float | None = None) -> Snapshot:
    spans = [span(peer(i), 0, 8) for i in servers]
    return write_snapshot(crawl_result({MODEL: spans}, {peer(i): REACHABLE for i in servers}, started_at=started_at))


# ----- one report per snapshot -----


@pytest.mark.django_db
def test_the_report_is_built_once_per_snapshot(client, django_assert_max_num_queries):
    first = _write(1)
    builds = REPORTS.builds
    for url in ("/", "/?fragment=1", "/api/v1/state", "/metrics", "/", "/api/v1/state"):
        assert client.get(url).status_code == 200, url
    assert REPORTS.builds == builds + 1
    assert set(current_report().derived) == {"model_json", "metrics_text"}  # the APIs' parts, derived once
    with django_assert_max_num_queries(1):  # only: which snapshot is the latest?
        assert client.get("/api/v1/state").json()["model_reports"][0]["server_rows"][0]["peer_id"] == peer(1)

    second = _write(2)  # a newer snapshot is never answered with the cached older report
    assert [r["peer_id"] for r in client.get("/api/v1/state").json()["model_reports"][0]["server_rows"]] == [peer(2)]
    assert f'data-snapshot-id="{second.pk}"' in client.get("/?fragment=1").content.decode()
    assert REPORTS.builds == builds + 2 and first.pk != second.pk


@pytest.mark.django_db
def test_age_and_staleness_are_of_each_request(settings):
    settings.MONITOR_UPDATE_PERIOD, settings.MONITOR_GAP_PERIODS = 60, 2.5  # stale after 150 s
    snapshot = _write(1, started_at=time.time() - 100)
    finished = snapshot.created_at + dt.timedelta(seconds=snapshot.duration)
    builds = REPORTS.builds
    fresh = current_report(now=finished + dt.timedelta(seconds=10))
    old = current_report(now=finished + dt.timedelta(seconds=200))
    assert REPORTS.builds == builds + 1 and fresh.models[0].rows is old.models[0].rows  # one build, shared
    assert (fresh.age_seconds, fresh.stale) == (10.0, False)
    assert (old.age_seconds, old.stale) == (200.0, True)
    assert current_report(now=finished + dt.timedelta(seconds=10)).stale is False  # the cached one is unchanged


@pytest.mark.django_db
def test_model_and_status_pages_share_the_staleness_rule(client, settings):
    """The crawl's finish is the reference: a long crawl that finished recently is not stale on either page."""
    settings.MONITOR_UPDATE_PERIOD, settings.MONITOR_GAP_PERIODS = 60, 2.5
    snapshot = _write(1, started_at=time.time() - 400)
    Snapshot.objects.filter(pk=snapshot.pk).update(duration=390.0)  # started 400 s ago, finished 10 s ago
    assert 'data-stale="false"' in client.get("/").content.decode()
    assert "Stale:" not in client.get(reverse("monitor:model", args=[MODEL.dht_prefix])).content.decode()
    Snapshot.objects.filter(pk=snapshot.pk).update(duration=0.5)  # finished 400 s ago
    REPORTS.clear()
    assert 'data-stale="true"' in client.get("/").content.decode()
    assert "Stale:" in client.get(reverse("monitor:model", args=[MODEL.dht_prefix])).content.decode()


@pytest.mark.django_db
def test_a_fresh_page_says_when_it_turns_stale(client, settings):
    settings.MONITOR_UPDATE_PERIOD, settings.MONITOR_GAP_PERIODS = 60, 2.5
    settings.MONITOR_REFRESH_JITTER = 7.5
    _write(1, started_at=time.time() - 50)
    html = client.get("/").content.decode()
    stale_in = int(re.search(r'data-stale-in="(\d+)"', html)[1])
    assert 95 <= stale_in <= 100  # 150 s after the crawl finished
    assert "data-stale-banner hidden" in html  # shown by status.js when that time comes
    assert 'data-refresh-jitter="7.5"' in html


# ----- the status page at scale -----


@pytest.mark.django_db
def test_the_status_page_lists_a_bounded_number_of_servers_verified_first(client, settings):
    settings.MONITOR_PAGE_SERVERS_PER_MODEL = 3
    states = {"a": ServerState.OFFLINE, "b": ServerState.JOINING, "c": ServerState.ONLINE}
    servers = [span(peer(p), i, 8, states.get(p, ServerState.ONLINE)) for i, p in enumerate("abcdefg")]
    pings = {peer("c"): UNREACHABLE, peer("d"): REACHABLE, peer("f"): REACHABLE}  # e, g: not checked
    write_snapshot(crawl_result({MODEL: servers}, pings))
    html = client.get("/").content.decode()

    assert _rows(html, MODEL.dht_prefix) == [("online", peer("d")), ("online", peer("f")), ("unknown", peer("e"))]
    section = html.split(f'data-dht-prefix="{MODEL.dht_prefix}"', 1)[1].split("</section>", 1)[0]
    assert "and 4 more servers" in section and f'href="/models/{MODEL.dht_prefix}/"' in section
    assert "7 servers (2 online, 2 not checked, 1 joining, 1 unreachable, 1 offline)" in " ".join(section.split())
    rows = client.get("/api/v1/state").json()["model_reports"][0]["server_rows"]
    assert len(rows) == 7  # the API keeps every server
    model_page = client.get(f"/models/{MODEL.dht_prefix}/").content.decode()
    assert 'href="/api/v1/state"' in model_page and '<tr class="server' not in model_page


@pytest.mark.django_db
def test_the_legend_explains_every_state(client):
    _write(1)
    html = client.get("/").content.decode()
    for state in reports.STATES:
        assert f'<span class="swatch {state}"></span>' in html, state


# ----- crawls never overlap -----


def test_the_crawl_lock_is_held_by_one_crawl(shared_cache):
    token = tasks.acquire_crawl_lock(seconds=60)
    assert token and tasks.acquire_crawl_lock(seconds=60) is None
    tasks.release_crawl_lock("someone-else")  # an expired crawl does not free its successor's lock
    assert tasks.acquire_crawl_lock(seconds=60) is None
    tasks.release_crawl_lock(token)
    assert tasks.acquire_crawl_lock(seconds=60) is not None


def test_the_crawl_lock_expires(shared_cache):
    assert tasks.acquire_crawl_lock(seconds=1)
    time.sleep(1.1)  # a crawl whose worker died frees the next one after the time limit
    assert tasks.acquire_crawl_lock(seconds=1)


def test_a_tick_during_a_crawl_starts_nothing(shared_cache, caplog):
    held = tasks.acquire_crawl_lock(seconds=60)
    with caplog.at_level(logging.WARNING, logger="monitor.tasks"):
        assert tasks.crawl_swarm() is None  # returns before it touches the DHT
    assert "The previous crawl has not finished" in caplog.text
    tasks.release_crawl_lock(held)


@pytest.mark.django_db
def test_saving_a_crawl_releases_its_lock_even_when_it_fails(shared_cache, monkeypatch):
    def broken_save(*args, **kwargs):
        raise RuntimeError("the database went away")

    monkeypatch.setattr(tasks, "_save_crawl", broken_save)
    token = tasks.acquire_crawl_lock(seconds=60)
    with pytest.raises(RuntimeError):
        tasks.save_crawl([], started_at=time.time(), targets=[], lock=token)
    assert tasks.acquire_crawl_lock(seconds=60) is not None


def run_settings_value(name: str, **env: str) -> str:
    """A setting as the production settings module reads it from this environment."""
    clean = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "CELERY_RESULT_EXPIRES")}
    code = f"import django; django.setup(); from django.conf import settings; print(settings.{name})"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**clean, "DJANGO_SETTINGS_MODULE": "config.settings", "DEBUG": "1", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_celery_results_expire():
    assert run_settings_value("CELERY_RESULT_EXPIRES") == "3600"
    assert run_settings_value("CELERY_RESULT_EXPIRES", CELERY_RESULT_EXPIRES="600") == "600"
    assert "filebased" in run_settings_value("CACHES")  # shared by the site's processes
    assert "RedisCache" in run_settings_value("CACHES", REDIS_URL="redis://127.0.0.1:6379/0")


def test_page_servers_per_model_has_a_default():
    assert conf.page_servers_per_model() == conf.PAGE_SERVERS_PER_MODEL == 100


def test_two_workers_taking_the_crawl_lock_at_once_in_a_folder_cache(shared_cache, monkeypatch):
    """The folder cache's `add` checks for the key, then writes it: without a file lock around it, two
    workers between those two steps both took the lock (the check is slowed here to make that certain)."""
    import threading

    from django.core.cache.backends.filebased import FileBasedCache

    has_key = FileBasedCache.has_key

    def slow_has_key(self, *args, **kwargs):
        found = has_key(self, *args, **kwargs)
        time.sleep(0.3)  # the other worker checks meanwhile
        return found

    monkeypatch.setattr(FileBasedCache, "has_key", slow_has_key)
    tokens: list[str | None] = []
    workers = [threading.Thread(target=lambda: tokens.append(tasks.acquire_crawl_lock(seconds=60))) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert sorted(token is not None for token in tokens) == [False, True]
