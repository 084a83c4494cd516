"""Pushes "a new snapshot landed" to open status pages, which then fetch the fresh fragment."""

from __future__ import annotations

import asyncio
import contextlib

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from channels.layers import InMemoryChannelLayer

from monitor import conf
from monitor.push import GROUP
from monitor.reports import latest_snapshot


@database_sync_to_async
def _latest_snapshot_id() -> int | None:
    snapshot = latest_snapshot()
    return snapshot.pk if snapshot else None


class StatusConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self) -> None:
        self.latest: int | None = None
        self.watcher: asyncio.Task | None = None
        await self.channel_layer.group_add(GROUP, self.channel_name)
        await self.accept()
        await self._tell(await _latest_snapshot_id())
        if isinstance(self.channel_layer, InMemoryChannelLayer):
            # The in-memory layer does not cross processes, and crawls run in Celery workers:
            # watch the database instead (Redis deployments get the push itself).
            self.watcher = asyncio.create_task(self._watch_database(conf.push_poll_seconds()))

    async def disconnect(self, code: int) -> None:
        if self.watcher is not None:
            self.watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.watcher
        await self.channel_layer.group_discard(GROUP, self.channel_name)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs) -> None:
        """Pages only listen; anything they send is ignored (not even parsed)."""

    async def snapshot_created(self, event: dict) -> None:
        snapshot_id = event.get("id")
        if isinstance(snapshot_id, int):
            await self._tell(snapshot_id)

    async def _watch_database(self, period: float) -> None:
        while True:
            await asyncio.sleep(period)
            await self._tell(await _latest_snapshot_id())

    async def _tell(self, snapshot_id: int | None) -> None:
        if snapshot_id is not None and snapshot_id != self.latest:
            self.latest = snapshot_id
            await self.send_json({"type": "snapshot", "id": snapshot_id})
