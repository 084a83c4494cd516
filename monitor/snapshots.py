"""Storing crawls: one snapshot per crawl, written in one transaction, and pruning old history.

Every value comes from a stranger and was validated by `swarm` (types, finite non-negative numbers,
bounded strings); here it is also made storable everywhere: NUL characters (PostgreSQL text refuses
them) are dropped, integers and rates are clamped, `inf` round trips become null. A throughput is
clamped to what one block can plausibly do (MAX_THROUGHPUT).

Only what the monitor verified counts: a server covers its blocks (coverage, health, the chat's
availability, aggregates) only when it announced ONLINE *and* answered the monitor's ping in this crawl
(`server_counts_as_online`, monitor.states). Anyone can announce ONLINE on every block with a huge throughput.

The history must not grow with what strangers announce: coverage is two arrays per model (not a row per
block), only the latest snapshot keeps its servers' `adapters` and `next_pings` (the pages read them from
no other), `next_pings` keeps at most MAX_STORED_PINGS entries keyed by valid peer ids, and pruning
deletes in bounded batches, each its own transaction.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterator
from functools import partial
from typing import Any

from django.db import connection, models, transaction
from django.utils import timezone

from monitor.crawl import PEER_ID, CrawlResult
from monitor.gcpause import paused_gc
from monitor.models import BootstrapObservation, ModelStatus, ServerObservation, ServerState, Snapshot
from monitor.push import announce_snapshot
from monitor.states import display_state, server_counts_as_online
from swarm.data_structures import RemoteSpanInfo
from swarm.ping import PingResult

__all__ = ["block_coverage", "display_state", "prune_history", "server_counts_as_online", "summarize", "write_snapshot"]

MAX_SECONDS = 1e9  # a round trip longer than this is a lie, and sums of lies must stay finite
# Tokens/s of one-token inference steps through one block (what `throughput` means, PROTOCOL.md): a step
# is several kernel launches or a Python round trip (tens of microseconds at least), so 1e5 is beyond any
# real server (this project's demo model on 2 CPU cores announces ~400; large models on GPUs, thousands).
MAX_THROUGHPUT = 1e5
# Tokens/s of long sequences through one block (forward_rps) or over the uplink (network_rps): 1e7 tokens/s
# of even a 64-wide hidden state in 16 bits is 20 Gbit/s.
MAX_TOKEN_RATE = 1e7
MAX_BIGINT = 2**63 - 1
# A real server pings the few servers that can follow its last block (swarm.server: 8); more is noise.
MAX_STORED_PINGS = 64
# Pruning: rows (servers, by Snapshot.num_servers) and snapshots deleted per transaction.
PRUNE_BATCH_ROWS = 20_000
PRUNE_BATCH_SNAPSHOTS = 100


def _text(value: str | None, limit: int) -> str:
    return (value or "").replace("\x00", "")[:limit]


def _rate(value: float | None, limit: float) -> float | None:
    return None if value is None else min(float(value), limit)


def _pings(pings: dict[str, float] | None) -> dict[str, float | None] | None:
    """The first MAX_STORED_PINGS entries whose key is a peer id; the others are dropped, not the server."""
    if pings is None:
        return None
    kept: dict[str, float | None] = {}
    for peer, rtt in pings.items():
        if len(kept) == MAX_STORED_PINGS:
            break
        if isinstance(peer, str) and PEER_ID.fullmatch(peer):
            kept[peer] = None if math.isinf(rtt) else min(rtt, MAX_SECONDS)
    return kept


def block_coverage(num_blocks: int, spans: list[tuple[int, int, float]]) -> tuple[list[int], list[float]]:
    """Per block: how many of the (start, end, throughput) spans hold it, and their summed throughput.
    Difference arrays keep this linear in servers plus blocks."""
    count_steps = [0] * (num_blocks + 1)
    rate_steps = [0.0] * (num_blocks + 1)
    for start, end, throughput in spans:
        start, end = max(start, 0), min(end, num_blocks)
        if start < end:
            count_steps[start] += 1
            count_steps[end] -= 1
            rate_steps[start] += throughput
            rate_steps[end] -= throughput
    counts, rates, count, rate = [], [], 0, 0.0
    for index in range(num_blocks):
        count += count_steps[index]
        rate += rate_steps[index]
        counts.append(count)
        rates.append(max(rate, 0.0) if count else 0.0)  # no float residue on uncovered blocks
    return counts, rates


def write_snapshot(result: CrawlResult) -> Snapshot:
    """Store a crawl atomically; the status pages hear about it once it is committed."""
    created_at = dt.datetime.fromtimestamp(result.started_at, tz=dt.UTC)
    with paused_gc(), transaction.atomic():
        snapshot = Snapshot.objects.create(
            created_at=created_at,
            duration=result.duration,
            num_servers=sum(len(model.spans) for model in result.models),
            invalid_entries=result.invalid_entries,
            invalid_index_entries=result.invalid_index_entries,
            skipped_models=result.skipped_models,
            capped_servers=sum(model.capped_servers for model in result.models),
            unchecked_servers=result.unchecked_servers,
            details_kept=True,
        )
        servers: list[dict[str, Any]] = []
        for position, crawl in enumerate(result.models):
            target = crawl.target
            rows = [_server_values(span, result.pings.get(span.peer_id)) for span in crawl.spans.values()]
            counts, rates = block_coverage(
                target.num_blocks,
                [
                    (r["start"], r["end"], r["throughput"])
                    for r in rows
                    if server_counts_as_online(r["state"], r["reachable"])
                ],
            )
            status = ModelStatus.objects.create(
                snapshot=snapshot,
                created_at=created_at,
                position=position,
                dht_prefix=target.dht_prefix,
                name=_text(target.name, 300),
                repository=_text(target.repository, 300),
                num_blocks=target.num_blocks,
                official=target.official,
                healthy=all(counts),
                num_servers=len(rows),
                invalid_entries=crawl.invalid_entries,
                coverage=counts,
                coverage_throughput=[_compact(rate) for rate in rates],
            )
            common = {
                "snapshot": snapshot.pk,
                "model": status.pk,
                "created_at": created_at,
                "dht_prefix": status.dht_prefix,
            }
            servers += [{**common, **row} for row in rows]
        insert_rows(ServerObservation, servers)
        insert_rows(
            BootstrapObservation,
            [
                {
                    "snapshot": snapshot.pk,
                    "position": position,
                    "peer_id": _text(peer_id, 128),
                    "reachable": ping.reachable,
                    "error": _text(ping.error, 300),
                    "rtt": ping.rtt,
                }
                for position, (peer_id, ping) in enumerate(result.bootstrap.items())
            ],
        )
        _keep_details_of_latest_only()
        transaction.on_commit(partial(announce_snapshot, snapshot.pk))
    return snapshot


def _compact(rate: float) -> float:
    """Six significant digits: a chart's precision, and a third of the JSON of a full float."""
    return float(f"{rate:.6g}")


def _keep_details_of_latest_only() -> None:
    """Clear `adapters` and `next_pings` of every snapshot but the latest (by time, as pages pick it).

    The snapshots that still hold them are marked (`details_kept`, a partial index): normally the one
    written before this, and a snapshot written out of order clears itself here. Two writes committed at
    once may both keep theirs; the next write clears both. One UPDATE, on the snapshot_id index."""
    holders = sorted(Snapshot.objects.filter(details_kept=True).order_by().values_list("created_at", "pk"))
    stale = [pk for _, pk in holders[:-1]]
    if stale:
        ServerObservation.objects.filter(snapshot_id__in=stale).update(adapters=[], next_pings=None)
        Snapshot.objects.filter(pk__in=stale).update(details_kept=False)


def insert_rows(model: type[models.Model], rows: list[dict[str, Any]]) -> None:
    """INSERT rows given as {field name: value} (every row the same fields; foreign keys as ids).

    `bulk_create` builds a model instance per row and prepares every value through its field: half
    the time of writing a 2000-server snapshot. Here only values that need it (JSON, datetimes) go
    through their field's `get_db_prep_save`; the rest are plain numbers, strings and booleans."""
    if not rows:
        return
    fields = [model._meta.get_field(name) for name in rows[0]]
    prepared = [i for i, field in enumerate(fields) if field.get_internal_type() in ("JSONField", "DateTimeField")]
    quote = connection.ops.quote_name
    sql = "INSERT INTO {} ({}) VALUES ({})".format(
        quote(model._meta.db_table), ", ".join(quote(field.column) for field in fields), ", ".join(["%s"] * len(fields))
    )
    params = []
    # Most rows share these values (the snapshot's time, no adapters, no pings): each is prepared once.
    shared: dict[tuple[int, Any], Any] = {}
    for row in rows:
        values = list(row.values())
        for i in prepared:
            value = values[i]
            if value is None or value == [] or isinstance(value, dt.datetime):
                key = (i, repr(value))
                if key not in shared:
                    shared[key] = fields[i].get_db_prep_save(value, connection)
                values[i] = shared[key]
            else:
                values[i] = fields[i].get_db_prep_save(value, connection)
        params.append(values)
    with connection.cursor() as cursor:
        cursor.executemany(sql, params)


def _server_values(span: RemoteSpanInfo, ping: PingResult | None) -> dict[str, Any]:
    info = span.server_info
    return {
        "peer_id": span.peer_id,
        "start": span.start,
        "end": span.end,
        "state": int(info.state),
        "reachable": ping.reachable if ping else None,
        "error": _text(ping.error if ping else None, 300),
        "rpc_latency": ping.rtt if ping else None,
        "throughput": _rate(info.throughput, MAX_THROUGHPUT),
        "inference_rps": _rate(info.inference_rps, MAX_THROUGHPUT),  # the same rate as throughput's bound
        "forward_rps": _rate(info.forward_rps, MAX_TOKEN_RATE),
        "network_rps": _rate(info.network_rps, MAX_TOKEN_RATE),
        "cache_tokens_left": None if info.cache_tokens_left is None else min(info.cache_tokens_left, MAX_BIGINT),
        "version": _text(info.version, 256),
        "public_name": _text(info.public_name, 256),
        "torch_dtype": _text(info.torch_dtype, 256),
        "quant_type": _text(info.quant_type, 16),
        "using_relay": info.using_relay,
        "adapters": [_text(name, 256) for name in info.adapters],
        "next_pings": _pings(info.next_pings),
    }


def prune_history(
    retention_seconds: float,
    now: dt.datetime | None = None,
    *,
    batch_rows: int = PRUNE_BATCH_ROWS,
    batch_snapshots: int = PRUNE_BATCH_SNAPSHOTS,
) -> int:
    """Delete snapshots older than the retention period; returns how many.

    Oldest first, in batches of at most `batch_snapshots` snapshots and about `batch_rows` server rows
    (at least one snapshot), each batch its own transaction: a prune after a long pause never holds one
    huge transaction. Every DELETE selects by snapshot id (an index on each table); rows go first,
    table by table, so the cascades Django looks for on the last two find nothing left."""
    cutoff = (now or timezone.now()) - dt.timedelta(seconds=retention_seconds)
    old = list(
        Snapshot.objects.filter(created_at__lt=cutoff).order_by("created_at", "pk").values_list("pk", "num_servers")
    )
    for batch in _batches(old, batch_rows, batch_snapshots):
        with transaction.atomic():
            ServerObservation.objects.filter(snapshot_id__in=batch).delete()
            BootstrapObservation.objects.filter(snapshot_id__in=batch).delete()
            ModelStatus.objects.filter(snapshot_id__in=batch).only("pk").delete()
            Snapshot.objects.filter(pk__in=batch).only("pk").delete()
    return len(old)


def _batches(snapshots: list[tuple[int, int]], max_rows: int, max_snapshots: int) -> Iterator[list[int]]:
    """Group (snapshot id, server rows) in order: each group at most `max_snapshots` snapshots and, unless
    one snapshot alone is larger, `max_rows` rows."""
    batch: list[int] = []
    rows = 0
    for pk, num_servers in snapshots:
        if batch and (rows + num_servers > max_rows or len(batch) >= max_snapshots):
            yield batch
            batch, rows = [], 0
        batch.append(pk)
        rows += num_servers
    if batch:
        yield batch


def summarize(snapshot: Snapshot) -> dict[str, Any]:
    """What a snapshot says, read back from the database (the crawl command prints it, tasks return it)."""
    models = []
    for status in snapshot.models.order_by("position"):
        servers = [
            {
                "peer_id": row.peer_id,
                "start": row.start,
                "end": row.end,
                "state": ServerState(row.state).label,
                "display_state": row.display_state,
                "reachable": row.reachable,
                "error": row.error,
                "public_name": row.public_name,
                "throughput": row.throughput,
                "using_relay": row.using_relay,
            }
            for row in status.servers.order_by("start", "peer_id")
        ]
        coverage = list(status.coverage or [])
        models.append(
            {
                "dht_prefix": status.dht_prefix,
                "name": status.name,
                "num_blocks": status.num_blocks,
                "healthy": status.healthy,
                "invalid_entries": status.invalid_entries,
                "servers": servers,
                "coverage": coverage,
            }
        )
    return {
        "id": snapshot.pk,
        "created_at": snapshot.created_at.isoformat(),
        "duration": snapshot.duration,
        "num_servers": snapshot.num_servers,
        "invalid_entries": snapshot.invalid_entries,
        "invalid_index_entries": snapshot.invalid_index_entries,
        "skipped_models": snapshot.skipped_models,
        "capped_servers": snapshot.capped_servers,
        "unchecked_servers": snapshot.unchecked_servers,
        "models": models,
        "bootstrap": [
            {"peer_id": row.peer_id, "reachable": row.reachable, "error": row.error}
            for row in snapshot.bootstrap.order_by("position")
        ],
    }
