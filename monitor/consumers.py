"""Pushes "a new snapshot landed" to open status pages, which then fetch the fresh fragment.

Each web process holds at most MONITOR_WS_PER_IP sockets per client (config.proxy.client_key: an IPv4
address or an IPv6 /64) and MONITOR_WS_TOTAL in all; one more is accepted and closed at once with
TOO_MANY_CODE, before it joins anything.

With the in-memory channel layer (the embedded mode), crawls written by Celery workers never reach this
process's layer: one task per process (`DatabaseWatcher`) polls the database for all open sockets and
pushes what changed to the group, one query per period however many pages are open.
"""

from __future__ import annotations

import asyncio
import logging

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from channels.layers import InMemoryChannelLayer
from django.db import Error as DatabaseError

from config.client_caps import ClientCaps
from config.proxy import client_key
from monitor import conf
from monitor.push import GROUP, MESSAGE_TYPE
from monitor.reports import latest_snapshot_key

logger = logging.getLogger(__name__)

TOO_MANY_CODE = 4429  # as HTTP 429: too many open status pages from this client, or in all


SOCKETS = ClientCaps()  # open status sockets of this process


@database_sync_to_async
def _latest_snapshot_id() -> int | None:
    latest = latest_snapshot_key()
    return latest[0] if latest else None


async def _read_latest_snapshot_id() -> int | None:
    """The latest snapshot's id; None (logged) when the database fails: the next tick or push tells it."""
    try:
        return await _latest_snapshot_id()
    except DatabaseError as e:
        logger.warning("Status sockets: the latest snapshot cannot be read (%s); trying again later", e)
        return None


class DatabaseWatcher:
    """One polling task per process (and event loop) while sockets are open; it stops with the last one."""

    def __init__(self) -> None:
        self._task: asyncio.Task | None = None
        self._sockets = 0

    def join(self, layer: InMemoryChannelLayer) -> None:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._sockets = 0  # a task of a finished loop counted sockets that are gone with it
            self._task = loop.create_task(self._watch(layer))
        self._sockets += 1

    def leave(self) -> None:
        self._sockets -= 1
        if self._sockets <= 0 and self._task is not None:
            self._task.cancel()
            self._task, self._sockets = None, 0

    @staticmethod
    async def _watch(layer: InMemoryChannelLayer) -> None:
        latest = None
        while True:
            await asyncio.sleep(conf.push_poll_seconds())
            snapshot_id = await _read_latest_snapshot_id()
            if snapshot_id is not None and snapshot_id != latest:
                latest = snapshot_id
                await layer.group_send(GROUP, {"type": MESSAGE_TYPE, "id": snapshot_id})


WATCHER = DatabaseWatcher()


class StatusConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self) -> None:
        self.latest: int | None = None
        self.watching = False
        client = self.scope.get("client") or ("unknown", 0)
        self.client_key: str | None = client_key(str(client[0]))
        per_client, overall = conf.websocket_caps()
        if SOCKETS.acquire(self.client_key, per_client, overall) is not None:
            self.client_key = None  # holds no slot
            logger.info("Status socket refused: too many open (per client %d, in all %d)", per_client, overall)
            await self.accept()  # accepted to say why: a refusal before accepting reads as a bare 403
            await self.close(code=TOO_MANY_CODE)
            return
        try:
            await self.channel_layer.group_add(GROUP, self.channel_name)
            await self.accept()
        except BaseException:  # e.g. Redis down: the socket fails, its slot must not leak
            SOCKETS.release(self.client_key)
            self.client_key = None
            raise
        await self._tell(await _read_latest_snapshot_id())
        if isinstance(self.channel_layer, InMemoryChannelLayer):  # Redis deployments get the push itself
            WATCHER.join(self.channel_layer)
            self.watching = True

    async def disconnect(self, code: int) -> None:
        if self.watching:
            WATCHER.leave()
            self.watching = False
        if self.client_key is None:
            return  # refused: it joined nothing
        SOCKETS.release(self.client_key)
        self.client_key = None
        await self.channel_layer.group_discard(GROUP, self.channel_name)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs) -> None:
        """Pages only listen; anything they send is ignored (not even parsed)."""

    async def snapshot_created(self, event: dict) -> None:
        snapshot_id = event.get("id")
        if isinstance(snapshot_id, int):
            await self._tell(snapshot_id)

    async def _tell(self, snapshot_id: int | None) -> None:
        if snapshot_id is not None and snapshot_id != self.latest:
            self.latest = snapshot_id
            await self.send_json({"type": "snapshot", "id": snapshot_id})
