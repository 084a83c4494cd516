"""Is a chat model usable right now? From the monitor's latest snapshot, else from the swarm itself.

The monitor app is optional: when it is installed and its latest snapshot (recent enough) has
the model, that answers; otherwise the swarm's DHT is read directly, and the answer is cached
for PLAYGROUND_AVAILABILITY_TTL seconds so that page views do not flood the DHT.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from typing import Any

from asgiref.sync import sync_to_async
from django.apps import apps
from django.conf import settings
from django.db import DatabaseError

from config.formatting import block_ranges
from playground.catalog import ChatModelSpec, configured_models
from playground.registry import SwarmIdentity, registry
from playground.workers import executor

logger = logging.getLogger(__name__)

DHT_READ_TIMEOUT = 10.0


@dataclasses.dataclass(frozen=True)
class Availability:
    state: str  # available, partial, unavailable, unknown
    message: str
    missing_blocks: tuple[int, ...] = ()
    servers: int = 0
    source: str | None = None  # monitor or swarm
    checked_at: float | None = None  # unix time

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "missing_blocks": list(self.missing_blocks)}


def describe(num_blocks: int, missing: list[int], servers: int, source: str, checked_at: float) -> Availability:
    if not missing:
        # The monitor counts servers it reached; the swarm's own answer is what servers announce, which
        # anyone can (a flood of fakes would look "available" here): the message says which it is.
        served = "served by" if source == "monitor" else "announced (not checked) by"
        return Availability(
            "available", f"all {num_blocks} blocks {served} {servers} server(s)", (), servers, source, checked_at
        )
    if len(missing) == num_blocks:
        return Availability(
            "unavailable", "no server holds this model right now", tuple(missing), 0, source, checked_at
        )
    return Availability(
        "partial",
        f"blocks {block_ranges(missing)} are not served right now",
        tuple(missing),
        servers,
        source,
        checked_at,
    )


# ----- the monitor's latest snapshot (optional app; a narrow read of its models) -----


def from_monitor(prefixes: list[str]) -> dict[str, Availability]:
    if not apps.is_installed("monitor"):
        return {}
    try:
        from django.db.models import Count

        from monitor.conf import gap_seconds
        from monitor.models import ModelStatus, ServerObservation, ServerState, Snapshot

        snapshot = Snapshot.objects.order_by("-created_at").first()
        # A snapshot the monitor itself calls stale says little about now (one home for that limit).
        if snapshot is None or time.time() - snapshot.created_at.timestamp() > gap_seconds():
            return {}
        # Only servers the monitor reached count (its coverage counts no others): anyone can announce
        # ONLINE servers, and a flood of them must not make a model look served.
        verified = dict(
            ServerObservation.objects.filter(
                snapshot=snapshot, dht_prefix__in=prefixes, state=ServerState.ONLINE, reachable=True
            )
            .values("dht_prefix")
            .annotate(servers=Count("id"))
            .values_list("dht_prefix", "servers")
        )
        found = {}
        for status in ModelStatus.objects.filter(snapshot=snapshot, dht_prefix__in=prefixes):
            missing = status.missing_blocks()
            found[status.dht_prefix] = describe(
                status.num_blocks,
                missing,
                verified.get(status.dht_prefix, 0),
                "monitor",
                snapshot.created_at.timestamp(),
            )
        return found
    except (ImportError, LookupError, AttributeError, DatabaseError) as e:
        # Not migrated yet, or a monitor of another shape: the swarm will answer instead.
        logger.info("No availability from the monitor: %s", e)
        return {}


# ----- the swarm itself -----

_cache: dict[str, Availability] = {}
_cache_lock = threading.Lock()


def from_swarm(spec: ChatModelSpec, identity: SwarmIdentity) -> Availability:
    """Read the model's block announcements from the DHT (blocking; cached for a while)."""
    from swarm.dht import fetch_swarm

    with _cache_lock:
        cached = _cache.get(spec.name)
    if cached and cached.checked_at and time.time() - cached.checked_at < settings.PLAYGROUND_AVAILABILITY_TTL:
        return cached
    try:
        dht = registry.dht(spec.peers)
        view = fetch_swarm(dht, identity.dht_prefix, identity.num_blocks, wait=False).result(DHT_READ_TIMEOUT)
        # With an adapter, only the servers that announce it count (the client routes through no others).
        spans = [s for s in view.online_spans() if not spec.adapter or spec.adapter in s.server_info.adapters]
        covered = {index for span in spans for index in range(span.start, span.end)}
        missing = [index for index in range(identity.num_blocks) if index not in covered]
        answer = describe(identity.num_blocks, missing, len(spans), "swarm", time.time())
    except Exception as e:
        logger.warning("Could not read the swarm of %s: %s", spec.name, e)
        answer = Availability("unknown", "the swarm could not be reached", checked_at=time.time(), source="swarm")
    with _cache_lock:
        _cache[spec.name] = answer
    return answer


async def all_models() -> list[dict[str, Any]]:
    """Every configured model with its availability, for the chat page's model picker."""
    loop = asyncio.get_running_loop()
    specs = list(configured_models().values())
    identities: dict[str, SwarmIdentity | None] = {}
    for spec in specs:
        try:
            identities[spec.name] = await loop.run_in_executor(executor(), registry.identity, spec.name)
        except Exception as e:
            logger.warning("Could not read the config of %s: %s", spec.name, e)
            identities[spec.name] = None
    prefixes = [identity.dht_prefix for identity in identities.values() if identity]
    monitored = await sync_to_async(from_monitor)(prefixes)
    rows = []
    for spec in specs:
        identity = identities[spec.name]
        if identity is None:
            availability = Availability("unknown", "this model's configuration could not be read")
        elif identity.dht_prefix in monitored and not spec.adapter:  # the monitor counts servers of any adapter
            availability = monitored[identity.dht_prefix]
        else:
            availability = await loop.run_in_executor(executor(), from_swarm, spec, identity)
        rows.append({"name": spec.name, "display_name": spec.display_name, **availability.as_dict()})
    return rows
