"""Telling open status pages that a new snapshot landed (Channels group messages)."""

from __future__ import annotations

import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

logger = logging.getLogger(__name__)

GROUP = "monitor.snapshots"
MESSAGE_TYPE = "snapshot.created"


def announce_snapshot(snapshot_id: int) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(GROUP, {"type": MESSAGE_TYPE, "id": snapshot_id})
    except Exception as e:  # a page that misses one push catches up on the next; the crawl must not fail
        logger.warning("Could not announce snapshot %s: %s", snapshot_id, e)
