"""JSON and text APIs: /api/v1/state (health.petals.dev shape), /metrics, the history API, since=."""

from __future__ import annotations

import datetime as dt
import re
import time

import pytest

from monitor import history
from monitor.history import parse_since
from monitor.snapshots import write_snapshot
from swarm.data_structures import ServerState
from tests.test_monitor_snapshots import MODEL, REACHABLE, UNREACHABLE, crawl_result, peer, span

NOW = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1h", NOW - dt.timedelta(hours=1)),
        ("90m", NOW - dt.timedelta(minutes=90)),
        ("7d", NOW - dt.timedelta(days=7)),
        (None, NOW - dt.timedelta(hours=24)),
        ("1767261600", dt.datetime(2026, 1, 1, 10, 0, tzinfo=dt.UTC)),
        ("2026-01-01T10:00:00Z", dt.datetime(2026, 1, 1, 10, 0, tzinfo=dt.UTC)),
        ("2026-01-01T10:00:00", dt.datetime(2026, 1, 1, 10, 0, tzinfo=dt.UTC)),
    ],
)
def test_parse_since(value, expected):
    assert parse_since(value, NOW) == expected


@pytest.mark.parametrize("value", ["yesterday", "1w", "-1h", "2026-13-45", "x" * 100])
def test_parse_since_refuses_garbage(value):
    with pytest.raises(ValueError):
        parse_since(value, NOW)


@pytest.mark.django_db
def test_state_api_has_the_health_petals_dev_shape(client):
    assert client.get("/api/v1/state").status_code == 503
    a, b = peer("a"), peer("b")
    write_snapshot(
        crawl_result(
            {
                MODEL: [
                    span(
                        a, 0, 4, public_name="alice", next_pings={b: 0.02}, cache_tokens_left=4000, adapters=("o/lora",)
                    ),
                    span(b, 4, 8),
                ]
            },
            {a: REACHABLE, b: UNREACHABLE},
            bootstrap={peer("boot"): REACHABLE},
        )
    )
    state = client.get("/api/v1/state").json()
    assert set(state) >= {
        "bootstrap_states",
        "top_contributors",
        "model_reports",
        "reachability_issues",
        "last_updated",
        "update_period",
        "update_duration",
    }
    assert state["bootstrap_states"] == ["online"]
    (issue,) = state["reachability_issues"]
    assert (
        issue["peer_id"] == b and issue["err"] == "routing: not found" and issue["where"] == [f"{MODEL.dht_prefix} 4:8"]
    )
    assert state["stale"] is False and 0 <= state["age_seconds"] < 3600
    (model,) = state["model_reports"]
    assert model["dht_prefix"] == MODEL.dht_prefix and model["num_blocks"] == 8 and model["state"] == "broken"
    rows = {row["peer_id"]: row for row in model["server_rows"]}
    assert rows[a]["state"] == "online" and rows[b]["state"] == "unreachable"
    assert rows[a]["span"]["start"] == 0 and rows[a]["span"]["end"] == 4
    info = rows[a]["span"]["server_info"]
    assert info["state"] == "online" and info["public_name"] == "alice" and info["throughput"] == 10.0
    assert rows[a]["cache_tokens_left_per_block"] == 4000 // (2 * 4)
    assert rows[a]["adapters"] == [{"name": "o/lora", "short_name": "lora"}]
    assert rows[b]["pings_to_me"] == {a: 0.02}
    assert state["top_contributors"] == {"alice": 4}


def _metric_families(text: str) -> dict[str, list[str]]:
    families: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            current = line.split()[2]
            assert current not in families, f"{current} has two TYPE lines"
            families[current] = []
        elif line and not line.startswith("#"):
            name = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line)[0]
            assert name == current, f"sample {name} outside its family"
            float(line.rsplit(" ", 1)[1])
            families[current].append(line)
    return families


@pytest.mark.django_db
def test_metrics_keep_health_petals_dev_names_in_valid_exposition_format(client):
    assert client.get("/metrics").status_code == 503
    hostile_version = 'v1"}\nfake_metric 1'
    write_snapshot(
        crawl_result(
            {
                MODEL: [
                    span(peer(1), 0, 8, version=hostile_version, next_pings={peer(2): 0.01}),
                    span(peer(2), 0, 4, ServerState.OFFLINE, version="2.3.0", inference_rps=3.0),
                ]
            },
            {peer(1): REACHABLE},
            invalid=7,
        )
    )
    response = client.get("/metrics")
    assert response["Content-Type"].startswith("text/plain")
    families = _metric_families(response.content.decode())
    for name in (
        "update_duration",
        "servers_num_total",
        "servers_num_relay",
        "server_version",
        "n_blocks",
        "servers_num",
        "blocks_total",
        "blocks_online_min",
        "blocks",
        "rps_avg",
        "rps_min",
        "ping_pct",
        "crawl_duration_seconds",
        "crawl_invalid_entries",
    ):
        assert families.get(name), name
    assert "fake_metric" not in families
    assert families["crawl_invalid_entries"] == ["crawl_invalid_entries 7"]
    assert 'blocks{model="demo-hf",state="online"} 8' in families["blocks"]
    assert 'blocks{model="demo-hf",state="offline"} 4' in families["blocks"]
    assert 'server_version{version_number="v1\\"}\\nfake_metric 1"} 1' in families["server_version"]


@pytest.mark.django_db
def test_history_api_returns_chart_data_for_the_range(client, settings):
    settings.MONITOR_UPDATE_PERIOD = 600  # the crawls below are one period apart: no gaps
    now = time.time()
    a = peer("a")
    for age, end in ((7200, 8), (1800, 8), (1200, 7), (600, 8)):
        write_snapshot(
            crawl_result({MODEL: [span(a, 0, end, throughput=float(end))]}, {a: REACHABLE}, started_at=now - age)
        )

    data = client.get(f"/api/v1/models/{MODEL.dht_prefix}/history?since=1h").json()
    assert data["snapshots"] == 3  # the one two hours ago is outside the range
    assert data["coverage"]["blocks"] == list(range(8))
    assert data["coverage"]["online_servers"][7] == [1, 0, 1]
    assert data["availability"]["overall"] == pytest.approx(2 / 3)
    assert data["current"]["online_servers"] == [1] * 8
    assert [p["peer_id"] for p in data["peers"]] == [a]
    assert data["peers"][0]["throughput"] == [8.0, 7.0, 8.0]
    assert set(data["figures"]) == {"coverage", "servers", "throughput", "availability", "peers"}

    assert client.get(f"/api/v1/models/{MODEL.dht_prefix}/history?since=3h").json()["snapshots"] == 4
    assert client.get(f"/api/v1/models/{MODEL.dht_prefix}/history?since=soon").status_code == 400
    unknown = client.get("/api/v1/models/unknown/history")
    assert unknown.status_code == 404  # as the model's page
    assert unknown.json() == {"error": "no crawl has seen the model 'unknown'"}
    assert client.get("/models/unknown/").status_code == 404


@pytest.mark.django_db
def test_history_samples_long_ranges(client, monkeypatch):
    monkeypatch.setattr(history, "MAX_POINTS", 4)
    now = time.time()
    for i in range(10):
        write_snapshot(crawl_result({MODEL: [span(peer(1), 0, 8)]}, {peer(1): REACHABLE}, started_at=now - 60 * i))
    data = client.get(f"/api/v1/models/{MODEL.dht_prefix}/history?since=1h").json()
    assert data["snapshots"] == 10
    assert len(data["coverage"]["times"]) == 4 and data["coverage"]["times"] == sorted(data["coverage"]["times"])
    assert data["availability"]["overall"] == 1.0


@pytest.mark.django_db
def test_is_reachable_refuses_what_is_not_a_peer_id(client):
    response = client.get("/api/v1/is_reachable/not-a-peer!")
    assert response.status_code == 400
    assert response.json()["success"] is False


@pytest.mark.django_db
def test_history_leaves_gaps_where_no_crawl_ran_and_counts_only_observed_time(client, settings):
    """The site was down between two runs of crawls: no coverage, no availability, broken lines there."""
    settings.MONITOR_UPDATE_PERIOD = 60  # gaps: crawls more than 150 s apart
    now = time.time()
    a = peer("a")
    for age, end in ((3000, 8), (2900, 8), (2800, 8), (600, 6)):  # healthy thrice, then broken after the gap
        write_snapshot(crawl_result({MODEL: [span(a, 0, end)]}, {a: REACHABLE}, started_at=now - age))
    data = client.get(f"/api/v1/models/{MODEL.dht_prefix}/history?since=1h").json()
    assert len(data["gaps"]) == 1
    assert data["coverage"]["online_servers"][0] == [1, 1, 1, None, None, 1]  # two blank columns in the gap
    assert data["coverage"]["online_servers"][7] == [1, 1, 1, None, None, 0]
    assert data["coverage"]["times"] == sorted(data["coverage"]["times"])
    assert data["peers"][0]["throughput"] == [10.0, 10.0, 10.0, None, None, 10.0]
    availability = data["availability"]
    # Healthy for 100 + 100 + 60 s (the last crawl before the gap stands for one period), broken for 60 s:
    # by time, not by crawls (3 of 4), and the hour without crawls counts neither way.
    assert availability["observed_seconds"] == pytest.approx(320)
    assert availability["overall"] == pytest.approx(260 / 320)
    assert None in availability["share"]  # the line breaks at the gap
    shown = [share for share in availability["share"] if share is not None]
    assert shown[0] == 1.0 and shown[-1] == 0.0
    before, after = data["figures"]["availability"]["data"]  # one filled trace per run of crawls
    assert before["y"] == [100] * 4 and after["y"] == [0, 0]  # a point per bucket (75 s wide here), then the end


@pytest.mark.django_db
def test_a_stale_snapshot_says_so(client):
    """After a restart without workers, the last crawl is served with its age and a staleness flag."""
    a = peer("a")
    write_snapshot(crawl_result({MODEL: [span(a, 0, 8)]}, {a: REACHABLE}, started_at=time.time() - 3 * 3600 - 30))
    state = client.get("/api/v1/state").json()
    assert state["stale"] is True and 3 * 3600 < state["age_seconds"] < 3 * 3600 + 600
    metrics = client.get("/metrics").content.decode()
    assert "\ncrawl_stale 1\n" in metrics
    html = client.get("/").content.decode()
    assert 'data-stale="true"' in html and "Stale: this is the last crawl" in html and "(3 h 0 min ago)" in html
    write_snapshot(crawl_result({MODEL: [span(a, 0, 8)]}, {a: REACHABLE}))
    assert client.get("/api/v1/state").json()["stale"] is False
    html = client.get("/").content.decode()
    assert 'data-stale="false"' in html and "Stale: this is the last crawl" not in html  # (status.js may mark it later)
