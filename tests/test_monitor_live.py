"""Live updates of the status page: the websocket's caps per client and in all, a database that fails
under the live-update loop, and the page in a browser (a jittered refresh, a report that turns stale)."""

from __future__ import annotations

import re
import time

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.testing import WebsocketCommunicator
from django.db import OperationalError
from django.utils import timezone

from config.asgi import application
from monitor import consumers
from monitor.consumers import SOCKETS, TOO_MANY_CODE
from monitor.models import Snapshot
from monitor.reports import REPORTS
from tests.test_monitor_cache import _write
from tests.test_monitor_push import _write as write_pushed
from tests.test_monitor_swarm import browser  # noqa: F401

pytestmark = pytest.mark.django_db(transaction=True)  # the consumer reads from its own thread


def _communicator(address: str) -> WebsocketCommunicator:
    communicator = WebsocketCommunicator(application, "/ws/monitor/", headers=[(b"origin", b"http://localhost")])
    communicator.scope["client"] = (address, 50000)
    return communicator


async def _open(address: str) -> WebsocketCommunicator:
    communicator = _communicator(address)
    connected, _ = await communicator.connect()
    assert connected
    return communicator


async def _refused(address: str) -> bool:
    """Accepted and closed at once with TOO_MANY_CODE, having joined nothing."""
    communicator = _communicator(address)
    connected, _ = await communicator.connect()
    message = await communicator.receive_output(timeout=5)
    await communicator.wait()
    return connected and message == {"type": "websocket.close", "code": TOO_MANY_CODE}


def test_sockets_are_capped_per_client_and_in_all(settings):
    settings.MONITOR_WS_PER_IP, settings.MONITOR_WS_TOTAL = 2, 4
    settings.MONITOR_PUSH_POLL_SECONDS = 60

    async def scenario():
        first = [await _open("203.0.113.7"), await _open("203.0.113.7")]
        assert await _refused("203.0.113.7")
        # One IPv6 subscriber holds a whole /64: its addresses share a cap.
        v6 = [await _open("2001:db8:1:2::1"), await _open("2001:db8:1:2:ffff::9")]
        assert await _refused("2001:db8:1:2::abcd")
        assert await _refused("198.51.100.1")  # 4 open in all
        await first[0].disconnect()
        assert SOCKETS.total == 3
        again = await _open("198.51.100.1")  # a closed page frees its slot
        for communicator in (first[1], *v6, again):
            await communicator.disconnect()
        assert SOCKETS.total == 0

    async_to_sync(scenario)()


def test_pushes_reach_sockets_under_the_cap_only(settings):
    settings.MONITOR_WS_PER_IP, settings.MONITOR_PUSH_POLL_SECONDS = 1, 60

    async def scenario():
        listening = await _open("203.0.113.8")
        assert await _refused("203.0.113.8")
        snapshot_id = await sync_to_async(write_pushed)()
        assert await listening.receive_json_from(timeout=5) == {"type": "snapshot", "id": snapshot_id}
        await listening.disconnect()

    async_to_sync(scenario)()


def write_silently() -> int:
    """A snapshot as a Celery worker writes it: no message reaches this process's in-memory layer."""
    return Snapshot.objects.create(created_at=timezone.now(), duration=0.1).pk


def test_a_failing_database_is_retried_by_the_live_update_loop(settings, monkeypatch, caplog):
    settings.MONITOR_PUSH_POLL_SECONDS = 0.1
    real = consumers.latest_snapshot_key
    failures = {"left": 3}

    def flaky():
        if failures["left"]:
            failures["left"] -= 1
            raise OperationalError("database is locked")
        return real()

    monkeypatch.setattr(consumers, "latest_snapshot_key", flaky)

    async def scenario():
        communicator = await _open("203.0.113.9")  # its first read fails too: the socket stays open
        snapshot_id = await sync_to_async(write_silently)()  # only the database loop can tell it
        assert await communicator.receive_json_from(timeout=5) == {"type": "snapshot", "id": snapshot_id}
        await communicator.disconnect()

    async_to_sync(scenario)()
    assert failures["left"] == 0
    assert caplog.text.count("the latest snapshot cannot be read") == 3


# ----- the page in a browser -----


@pytest.mark.browser
def test_the_open_page_refreshes_with_jitter_and_turns_stale(live_server, browser, settings, monkeypatch):  # noqa: F811
    """A push makes the page fetch the fragment after a random wait, not at once; and a report that
    outlives the crawls' gap is marked stale in the open page, without any push, and again after a swap."""
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "1")  # Playwright's loop runs in this thread; the ORM too
    REPORTS.clear()
    settings.MONITOR_UPDATE_PERIOD, settings.MONITOR_GAP_PERIODS = 1, 4.0  # stale 4 s after the crawl
    settings.MONITOR_REFRESH_JITTER = 2.0
    first = _write(1)
    page = browser.new_page()
    try:
        fetched: list[float] = []
        sockets: list = []  # the page's socket, answered here (the test server speaks no websockets)
        page.on("request", lambda request: "fragment=1" in request.url and fetched.append(time.monotonic()))
        page.route_web_socket(re.compile(r".*/ws/monitor/"), lambda socket: sockets.append(socket))
        page.add_init_script("Math.random = () => 0.75;")  # the page's wait: 0.75 of the jitter
        page.goto(live_server.url + "/")
        assert page.locator("#status").get_attribute("class") == "monitor"
        assert page.locator("[data-stale-banner]").is_hidden()
        page.wait_for_function("() => document.getElementById('status').classList.contains('is-stale')", timeout=10_000)
        assert page.locator("[data-stale-banner]").is_visible()  # no push came: the page knows it is old

        second = _write(2)
        assert sockets, "the page opened no socket"
        pushed = time.monotonic()
        sockets[-1].send(f'{{"type": "snapshot", "id": {second.pk}}}')
        page.wait_for_function(
            "id => document.querySelector('[data-snapshot-id]').dataset.snapshotId === id", arg=str(second.pk)
        )
        assert len(fetched) == 1 and 1.3 < fetched[0] - pushed < 3.0  # 0.75 × 2 s after the push
        assert first.pk != second.pk
        # The swapped-in report is fresh, then stale again once the gap passes.
        assert not page.evaluate("document.getElementById('status').classList.contains('is-stale')")
        page.wait_for_function("() => document.getElementById('status').classList.contains('is-stale')", timeout=10_000)
    finally:
        page.close()
