"""The status page's websocket: it hears about new snapshots through the channel layer (in memory and
Redis), and from the database when crawls run in other processes with the in-memory layer."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.testing import WebsocketCommunicator

from config.asgi import application
from monitor.models import Snapshot
from monitor.snapshots import write_snapshot
from tests.conftest import unavailable
from tests.test_monitor_snapshots import MODEL, REACHABLE, crawl_result, peer, span

pytestmark = pytest.mark.django_db(transaction=True)  # the consumer reads from its own thread

REDIS_URL = "redis://127.0.0.1:6379/12"


def _write() -> int:
    return write_snapshot(crawl_result({MODEL: [span(peer(1), 0, 8)]}, {peer(1): REACHABLE})).pk


async def _connect() -> WebsocketCommunicator:
    communicator = WebsocketCommunicator(application, "/ws/monitor/", headers=[(b"origin", b"http://localhost")])
    connected, _ = await communicator.connect()
    assert connected
    return communicator


def test_new_snapshots_are_pushed_to_open_pages(settings):
    settings.MONITOR_PUSH_POLL_SECONDS = 60  # only the push can deliver within the test

    async def scenario():
        first = await sync_to_async(_write)()
        communicator = await _connect()
        assert await communicator.receive_json_from(timeout=5) == {"type": "snapshot", "id": first}
        second = await sync_to_async(_write)()  # announces on commit
        assert await communicator.receive_json_from(timeout=5) == {"type": "snapshot", "id": second}
        await communicator.send_to(text_data="not json {")  # pages only listen; junk is ignored
        await communicator.send_to(bytes_data=b"\x00\x01")
        assert await communicator.receive_nothing(timeout=0.3)
        third = await sync_to_async(_write)()
        assert await communicator.receive_json_from(timeout=5) == {"type": "snapshot", "id": third}
        await communicator.disconnect()

    async_to_sync(scenario)()


def test_snapshots_written_by_other_processes_are_noticed(settings):
    """A Celery worker's in-memory layer cannot reach the web process: the consumer watches the database."""
    settings.MONITOR_PUSH_POLL_SECONDS = 0.2

    def write_silently() -> int:  # as another process would: no message reaches this process's layer
        return Snapshot.objects.create(created_at="2026-01-01T00:00:00Z", duration=0.1).pk

    async def scenario():
        communicator = await _connect()
        assert await communicator.receive_nothing(timeout=0.5)  # no snapshot yet
        snapshot_id = await sync_to_async(write_silently)()
        assert await communicator.receive_json_from(timeout=5) == {"type": "snapshot", "id": snapshot_id}
        await communicator.disconnect()

    async_to_sync(scenario)()


def _redis_available() -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def test_push_through_redis(settings):
    if not _redis_available():
        unavailable("Redis is not reachable at 127.0.0.1:6379")
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL], "prefix": f"monitor-test-{uuid.uuid4().hex[:8]}"},
        }
    }
    settings.MONITOR_PUSH_POLL_SECONDS = 60

    async def scenario():
        communicator = await _connect()
        assert await communicator.receive_nothing(timeout=0.3)
        snapshot_id = await sync_to_async(_write)()
        assert await communicator.receive_json_from(timeout=5) == {"type": "snapshot", "id": snapshot_id}
        await communicator.disconnect()
        await asyncio.sleep(0)

    async_to_sync(scenario)()
