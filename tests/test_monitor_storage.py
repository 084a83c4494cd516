"""The monitor's database does not grow with strangers' data: servers' adapters and next_pings stay only in
the latest snapshot, next_pings keys are peer ids and bounded, coverage is two arrays per model, pruning
deletes in batches, and every UPDATE and DELETE that this takes finds its rows through an index."""

from __future__ import annotations

import datetime as dt
import time

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from monitor.history import model_history, peer_history
from monitor.models import BootstrapObservation, ModelStatus, ServerObservation, Snapshot
from monitor.reports import status_report
from monitor.snapshots import MAX_STORED_PINGS, prune_history, write_snapshot
from monitor.targets import ModelTarget
from playground.availability import from_monitor
from swarm.data_structures import ServerState
from tests.test_monitor_snapshots import MODEL, REACHABLE, UNREACHABLE, crawl_result, peer, span

pytestmark = pytest.mark.django_db
BEFORE = [("monitor", "0001_initial")]


# Partial indexes hold only the rows a query wants: reading one whole is not a scan of the table.
PARTIAL_INDEXES = {index.name for index in Snapshot._meta.indexes if index.condition is not None}


def full_scans(sql: str) -> list[str]:
    """The steps of `sql`'s plan that read a monitor table whole (none: each is searched by an index)."""
    with connection.cursor() as cursor:
        if connection.vendor == "sqlite":
            cursor.execute("EXPLAIN QUERY PLAN " + sql)
            steps = [row[-1] for row in cursor.fetchall() if row[-1].startswith("SCAN monitor_")]
            return [step for step in steps if step.split(" USING INDEX ")[-1] not in PARTIAL_INDEXES]
        cursor.execute("SET LOCAL enable_seqscan = off")  # tiny test tables: make the planner show its indexes
        cursor.execute("EXPLAIN " + sql)
        return [row[0] for row in cursor.fetchall() if "Seq Scan on monitor_" in row[0]]


def writes(queries: CaptureQueriesContext, table: str) -> list[str]:
    return [q["sql"] for q in queries if q["sql"].startswith(("UPDATE", "DELETE")) and f"monitor_{table}" in q["sql"]]


def _with_details(n: int, started_at: float, **extra) -> Snapshot:
    a, b = peer(f"a{n}"), peer(f"b{n}")
    servers = [span(a, 0, 8, adapters=("org/lora",), next_pings={b: 0.01}), span(b, 0, 8, next_pings={a: 0.02})]
    return write_snapshot(crawl_result({MODEL: servers}, {a: REACHABLE, b: REACHABLE}, started_at=started_at, **extra))


def _details(snapshot: Snapshot) -> dict[str, tuple]:
    rows = ServerObservation.objects.filter(snapshot=snapshot).values_list("peer_id", "adapters", "next_pings")
    return {peer_id: (adapters, pings) for peer_id, adapters, pings in rows}


def _cleared(n: int) -> dict[str, tuple]:
    return {peer(f"a{n}"): ([], None), peer(f"b{n}"): ([], None)}


def _kept(n: int) -> dict[str, tuple]:
    a, b = peer(f"a{n}"), peer(f"b{n}")
    return {a: (["org/lora"], {b: 0.01}), b: ([], {a: 0.02})}


def test_only_the_latest_snapshot_keeps_adapters_and_next_pings():
    now = time.time()
    first = _with_details(1, now - 120)
    assert _details(first) == _kept(1)

    with CaptureQueriesContext(connection) as queries:
        second = _with_details(2, now - 60)
    assert _details(first) == _cleared(1)  # in the same transaction
    assert _details(second) == _kept(2)
    (update,) = writes(queries, "serverobservation")  # one UPDATE, by snapshot id
    assert "snapshot_id" in update and full_scans(update) == []
    for sql in [q["sql"] for q in queries if "details_kept" in q["sql"]]:
        assert full_scans(sql) == [], sql
    assert list(Snapshot.objects.filter(details_kept=True).values_list("pk", flat=True)) == [second.pk]

    # A crawl stored late (older than the latest) keeps nothing; the latest keeps its details.
    late = _with_details(3, now - 90)
    assert _details(late) == _cleared(3)
    assert _details(second) == _kept(2)

    # The pages read the details from the latest snapshot, the only one that has them.
    report = status_report(second, update_period=60)
    assert {row["peer_id"]: row["adapters"] for row in report.models[0].rows} == {
        peer("a2"): ["org/lora"],
        peer("b2"): [],
    }


def test_snapshots_that_kept_details_together_are_all_cleared_by_the_next_write():
    now = time.time()
    first, second = _with_details(1, now - 120), _with_details(2, now - 60)
    # As two writes committed at once leave it: both think they are the latest.
    ServerObservation.objects.filter(snapshot=first).update(adapters=["org/lora"])
    Snapshot.objects.filter(pk=first.pk).update(details_kept=True)
    third = _with_details(3, now)
    assert (_details(first), _details(second)) == (_cleared(1), _cleared(2))
    assert list(Snapshot.objects.filter(details_kept=True).values_list("pk", flat=True)) == [third.pk]


def test_next_pings_keep_only_peer_ids_and_at_most_a_bound():
    good = [peer(f"next {i}") for i in range(MAX_STORED_PINGS + 20)]
    junk = {"<script>alert(1)</script>": 0.5, "not a peer id": 0.5, "0OIl" * 10: 0.5, "": 0.5}
    announced = {**junk, **dict.fromkeys(good, 0.01)}
    liar, other = peer("liar"), peer("other")
    servers = [span(liar, 0, 4, next_pings=announced), span(other, 4, 8)]
    snapshot = write_snapshot(crawl_result({MODEL: servers}, {liar: REACHABLE, other: REACHABLE}))
    row = ServerObservation.objects.get(snapshot=snapshot, peer_id=liar)  # the server stays
    assert row.display_state == "online"
    assert set(row.next_pings) == set(good[:MAX_STORED_PINGS])  # the bad keys dropped, the rest bounded
    assert snapshot.models.get().healthy


def test_coverage_is_two_arrays_per_model_and_every_reader_uses_them():
    big = ModelTarget("big-hf", 1000, "Big")
    now = time.time()
    a, b, c = peer("a"), peer("b"), peer("c")
    old = write_snapshot(crawl_result({big: [span(a, 0, 1000, throughput=1 / 3)]}, {a: REACHABLE}, started_at=now - 60))
    latest = write_snapshot(
        crawl_result(
            {big: [span(a, 0, 500, throughput=2.0), span(b, 250, 900, throughput=1.0), span(c, 900, 1000)]},
            {a: REACHABLE, b: REACHABLE, c: UNREACHABLE},
            started_at=now,
        )
    )
    # One row per model and crawl, whatever the number of blocks.
    assert ModelStatus.objects.count() == 2 and "monitor_blockcoverage" not in connection.introspection.table_names()
    status = latest.models.get()
    assert status.coverage == [1] * 250 + [2] * 250 + [1] * 400 + [0] * 100
    assert status.coverage_throughput == [2.0] * 250 + [3.0] * 250 + [1.0] * 400 + [0.0] * 100
    assert old.models.get().coverage_throughput[0] == pytest.approx(1 / 3, rel=1e-5)  # six digits kept

    assert status_report(latest, update_period=60).models[0].missing_blocks == "900:1000"
    availability = from_monitor([big.dht_prefix])[big.dht_prefix]
    assert availability.missing_blocks == tuple(range(900, 1000))
    history = model_history(
        big.dht_prefix, dt.datetime.fromtimestamp(now - 120, dt.UTC), dt.datetime.fromtimestamp(now + 1, dt.UTC)
    )
    assert history["coverage"]["online_servers"][:3] == [[1, 1]] * 3
    assert history["coverage"]["online_servers"][300] == [1, 2]
    assert history["coverage"]["online_servers"][950] == [1, 0]
    assert history["current"]["online_servers"] == status.coverage
    assert history["current"]["throughput"] == status.coverage_throughput


def test_prune_in_small_batches_deletes_everything_old_and_nothing_new():
    now = time.time()
    boot = {peer("boot"): REACHABLE}
    servers = [span(peer(1), 0, 4), span(peer(2), 4, 8)]
    old = [write_snapshot(crawl_result({MODEL: servers}, started_at=now - 7200 - i, bootstrap=boot)) for i in range(5)]
    new = [write_snapshot(crawl_result({MODEL: servers}, started_at=now - i, bootstrap=boot)) for i in range(2)]

    with CaptureQueriesContext(connection) as queries:
        # 2 server rows per snapshot: batches of 2 snapshots (4 rows), the last one of 1.
        deleted = prune_history(3600, now=dt.datetime.fromtimestamp(now, tz=dt.UTC), batch_rows=4)
    assert deleted == 5
    assert set(Snapshot.objects.values_list("pk", flat=True)) == {s.pk for s in new}
    for model in (ModelStatus, ServerObservation, BootstrapObservation):
        assert not model.objects.filter(snapshot__in=old).exists(), model
        assert model.objects.filter(snapshot__in=new).count() == {ServerObservation: 4}.get(model, 2), model
    assert len(writes(queries, "serverobservation")) >= 3  # a DELETE per batch (3 batches)
    assert len([q for q in queries if q["sql"].startswith("SAVEPOINT")]) >= 3  # each batch its own transaction
    for sql in writes(queries, ""):
        assert full_scans(sql) == [], sql
    assert prune_history(3600, now=dt.datetime.fromtimestamp(now, tz=dt.UTC), batch_snapshots=1) == 0


def test_the_peer_history_and_the_row_use_the_one_online_rule():
    alice = peer("alice")
    now = time.time()
    write_snapshot(crawl_result({MODEL: [span(alice, 0, 8)]}, {alice: REACHABLE}, started_at=now - 120))
    write_snapshot(crawl_result({MODEL: [span(alice, 0, 8)]}, {}, started_at=now - 60))  # not pinged
    write_snapshot(crawl_result({MODEL: [span(alice, 0, 8)]}, {alice: UNREACHABLE}, started_at=now))
    rows = ServerObservation.objects.filter(peer_id=alice).order_by("created_at")
    assert [row.display_state for row in rows] == ["online", "unknown", "unreachable"]
    history = peer_history(
        alice, dt.datetime.fromtimestamp(now - 300, dt.UTC), dt.datetime.fromtimestamp(now + 1, dt.UTC)
    )
    assert [point["display_state"] for point in history["points"]] == ["online", "unknown", "unreachable"]
    joining = write_snapshot(crawl_result({MODEL: [span(peer("j"), 0, 8, ServerState.JOINING)]}, started_at=now + 1))
    assert ServerObservation.objects.get(snapshot=joining).display_state == "joining"


@pytest.mark.django_db(transaction=True)
def test_the_migration_turns_coverage_rows_into_arrays():
    executor = MigrationExecutor(connection)
    latest = [key for key in executor.loader.graph.leaf_nodes() if key[0] == "monitor"]
    executor.migrate(BEFORE)
    old = executor.loader.project_state(BEFORE).apps
    OldSnapshot, OldStatus, OldCoverage = (
        old.get_model("monitor", n) for n in ("Snapshot", "ModelStatus", "BlockCoverage")
    )
    now = timezone.now()
    for n, moment in enumerate((now - dt.timedelta(minutes=1), now)):
        snapshot = OldSnapshot.objects.create(created_at=moment, duration=1.0)
        status = OldStatus.objects.create(
            snapshot=snapshot, created_at=moment, position=0, dht_prefix="m", name="M", num_blocks=4, healthy=False
        )
        for block, count in enumerate([1, 2 + n, 0]):  # block 3 has no row: nothing held it
            OldCoverage.objects.create(
                snapshot=snapshot, model=status, created_at=moment, dht_prefix="m", block=block, online_servers=count,
                throughput=count / 3,
            )  # fmt: skip

    executor = MigrationExecutor(connection)
    executor.migrate(latest)
    statuses = list(ModelStatus.objects.order_by("created_at"))
    assert [s.coverage for s in statuses] == [[1, 2, 0, 0], [1, 3, 0, 0]]
    assert statuses[1].coverage_throughput == [0.333333, 1.0, 0.0, 0.0] and statuses[1].missing_blocks() == [2, 3]
    # The latest snapshot is the one that keeps its details from now on.
    assert list(Snapshot.objects.order_by("created_at").values_list("details_kept", flat=True)) == [False, True]
