"""Writing snapshots: rows and coverage match the crawl, hostile values are stored safely, a failed
write leaves nothing, old history is pruned. Also home of the small factories other monitor tests use."""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import time

import pytest
from django.db import DatabaseError, connection
from hivemind.p2p import PeerID

from monitor.crawl import CrawlResult, ModelCrawl
from monitor.models import BootstrapObservation, ModelStatus, ServerObservation, Snapshot
from monitor.snapshots import MAX_THROUGHPUT, block_coverage, prune_history, write_snapshot
from monitor.targets import ModelTarget
from swarm.data_structures import RemoteSpanInfo, ServerInfo, ServerState
from swarm.ping import PingResult

MODEL = ModelTarget("demo-hf", 8, "Demo")


def peer(n: int | str) -> str:
    """A real-looking base58 peer id, stable for a given n."""
    return PeerID(hashlib.sha256(f"peer {n}".encode()).digest()).to_base58()


def span(peer_id: str, start: int, end: int, state: ServerState = ServerState.ONLINE, **info) -> RemoteSpanInfo:
    info.setdefault("throughput", 10.0)
    server_info = ServerInfo(state=state, start_block=start, end_block=end, **info)
    return RemoteSpanInfo(peer_id, start, end, server_info)


def crawl_result(
    models: dict[ModelTarget, list[RemoteSpanInfo]],
    pings: dict[str, PingResult] | None = None,
    *,
    started_at: float | None = None,
    bootstrap: dict[str, PingResult] | None = None,
    invalid: int = 0,
) -> CrawlResult:
    return CrawlResult(
        started_at=time.time() if started_at is None else started_at,
        duration=0.25,
        models=[
            ModelCrawl(target, {s.peer_id: s for s in spans}, invalid_entries=invalid if i == 0 else 0)
            for i, (target, spans) in enumerate(models.items())
        ],
        pings=pings or {},
        bootstrap=bootstrap or {},
    )


REACHABLE = PingResult(reachable=True, rtt=0.004)
UNREACHABLE = PingResult(reachable=False, error="routing: not found")


def test_block_coverage_counts_and_sums_spans():
    counts, rates = block_coverage(6, [(0, 3, 2.0), (2, 6, 1.5), (5, 9, 4.0)])
    assert counts == [1, 1, 2, 1, 1, 2]
    assert rates == pytest.approx([2.0, 2.0, 3.5, 1.5, 1.5, 5.5])
    assert block_coverage(3, []) == ([0, 0, 0], [0.0, 0.0, 0.0])


@pytest.mark.django_db
def test_snapshot_rows_and_coverage_match_the_crawl():
    a, b, c, d, e = (peer(i) for i in "abcde")
    result = crawl_result(
        {
            MODEL: [
                span(a, 0, 4, throughput=10.0, public_name="alice", version="2.3.0", cache_tokens_left=800),
                span(b, 4, 8, throughput=5.0),
                span(c, 2, 6, throughput=100.0),  # unreachable: covers nothing
                span(d, 0, 8, ServerState.OFFLINE),
                span(e, 0, 2, ServerState.JOINING),
            ]
        },
        {a: REACHABLE, b: REACHABLE, c: UNREACHABLE},
        bootstrap={peer("boot"): REACHABLE, peer("boot2"): PingResult(False, error="no answer")},
        invalid=3,
    )
    snapshot = write_snapshot(result)

    assert snapshot.num_servers == 5 and snapshot.invalid_entries == 3
    status = ModelStatus.objects.get(snapshot=snapshot)
    assert status.healthy and status.num_servers == 5
    rows = {row.peer_id: row for row in ServerObservation.objects.filter(snapshot=snapshot)}
    assert {p: (r.start, r.end, r.display_state) for p, r in rows.items()} == {
        a: (0, 4, "online"),
        b: (4, 8, "online"),
        c: (2, 6, "unreachable"),
        d: (0, 8, "offline"),
        e: (0, 2, "joining"),
    }
    assert rows[a].rpc_latency == pytest.approx(0.004) and rows[a].public_name == "alice"
    assert rows[c].reachable is False and rows[c].error == "routing: not found"
    assert rows[d].reachable is None  # not pinged
    assert status.coverage == [1] * 8
    assert status.coverage_throughput == [10.0] * 4 + [5.0] * 4
    boot = list(BootstrapObservation.objects.filter(snapshot=snapshot).order_by("position"))
    assert [(row.reachable, row.error) for row in boot] == [(True, ""), (False, "no answer")]


@pytest.mark.django_db
def test_a_model_with_an_uncovered_block_is_broken():
    snapshot = write_snapshot(crawl_result({MODEL: [span(peer(1), 0, 7)]}, {peer(1): REACHABLE}))
    status = ModelStatus.objects.get(snapshot=snapshot)
    assert not status.healthy
    assert status.coverage == [1] * 7 + [0] and status.missing_blocks() == [7]


@pytest.mark.django_db
def test_hostile_values_are_stored_safely():
    hostile = span(
        peer("x"),
        0,
        8,
        throughput=1e300,  # finite, so valid on the wire, but absurd
        public_name="nul\x00byte <script>",
        version="v" * 256,
        cache_tokens_left=2**70,
        adapters=("a\x00b",),
        next_pings={peer("y"): math.inf, peer("z"): 0.01},
    )
    pings = {hostile.peer_id: PingResult(False, error="e\x00rr" + "x" * 1000), peer("y"): REACHABLE}
    snapshot = write_snapshot(crawl_result({MODEL: [hostile, span(peer("y"), 0, 8, throughput=1e300)]}, pings))
    row = ServerObservation.objects.get(snapshot=snapshot, peer_id=hostile.peer_id)
    assert row.public_name == "nulbyte <script>"
    assert row.throughput == MAX_THROUGHPUT and row.cache_tokens_left == 2**63 - 1
    assert row.adapters == ["ab"]
    assert row.next_pings == {peer("y"): None, peer("z"): 0.01}
    assert row.error.startswith("errxxx") and len(row.error) == 300
    assert snapshot.models.get().coverage_throughput[0] == MAX_THROUGHPUT  # the reachable one


def _fail_bootstrap_inserts() -> None:
    """Make the database itself refuse bootstrap rows (written last), as a full disk or a lost connection would."""
    with connection.cursor() as cursor:
        if connection.vendor == "sqlite":
            cursor.execute(
                "CREATE TRIGGER refuse_bootstrap BEFORE INSERT ON monitor_bootstrapobservation "
                "BEGIN SELECT RAISE(ABORT, 'refused'); END"
            )
        else:
            cursor.execute(
                "CREATE FUNCTION refuse_bootstrap() RETURNS trigger AS "
                "$$ BEGIN RAISE EXCEPTION 'refused'; END $$ LANGUAGE plpgsql"
            )
            cursor.execute(
                "CREATE TRIGGER refuse_bootstrap BEFORE INSERT ON monitor_bootstrapobservation "
                "FOR EACH ROW EXECUTE FUNCTION refuse_bootstrap()"
            )


@pytest.mark.django_db
def test_a_write_that_fails_midway_leaves_no_snapshot():
    _fail_bootstrap_inserts()
    result = crawl_result({MODEL: [span(peer(1), 0, 8)]}, {peer(1): REACHABLE}, bootstrap={peer("boot"): REACHABLE})
    with pytest.raises(DatabaseError):
        write_snapshot(result)
    # The snapshot, model and server rows were inserted before the bootstrap rows failed; all are gone.
    assert not Snapshot.objects.exists()
    assert not ModelStatus.objects.exists()
    assert not ServerObservation.objects.exists()


@pytest.mark.django_db
def test_prune_removes_old_snapshots_with_their_rows():
    now = time.time()
    boot = {peer("boot"): REACHABLE}
    old = write_snapshot(crawl_result({MODEL: [span(peer(1), 0, 8)]}, started_at=now - 3 * 3600, bootstrap=boot))
    recent = write_snapshot(crawl_result({MODEL: [span(peer(1), 0, 8)]}, started_at=now - 600, bootstrap=boot))
    deleted = prune_history(2 * 3600, now=dt.datetime.fromtimestamp(now, tz=dt.UTC))
    assert deleted == 1
    assert list(Snapshot.objects.values_list("pk", flat=True)) == [recent.pk]
    for model in (ModelStatus, ServerObservation, BootstrapObservation):
        assert not model.objects.filter(snapshot=old.pk).exists()
        assert model.objects.filter(snapshot=recent.pk).exists()
