"""The announced throughput: a steady statistic of several rounds, cached only when steady and fresh."""

from __future__ import annotations

import json
import time

import pytest
import torch
from transformers import AutoConfig

from swarm.checkpoint import CheckpointFiles
from swarm.models.registry import family_for, prepare_config
from swarm.server import throughput
from swarm.server.backend import SpanBackend, load_span
from swarm.server.throughput import is_fresh, loading_weights, measure_throughput, spread, steady_rate
from tests.conftest import DEMO_MODEL


def test_the_steady_rate_ignores_the_slow_rounds_and_one_lucky_round():
    unloaded = [100.0, 101.0, 99.0, 100.5, 99.5, 100.0, 100.2]
    assert steady_rate(unloaded) == pytest.approx(100.35)  # median of the fastest four
    loaded = [100.0, 31.0, 99.0, 24.0, 100.5, 12.0, 100.2]  # another process took the CPU for three rounds
    assert steady_rate(loaded) == pytest.approx(steady_rate(unloaded), rel=0.01)
    assert steady_rate([*unloaded, 900.0]) == pytest.approx(100.75)  # a timer glitch moves it little


def test_the_steady_rate_is_the_same_in_any_order_and_refuses_nonsense():
    rounds = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert steady_rate(rounds) == steady_rate(list(reversed(rounds))) == 4.0
    assert steady_rate([7.0]) == 7.0
    assert steady_rate([7.0, float("nan"), float("inf"), 0.0, -3.0]) == 7.0
    with pytest.raises(ValueError, match="no positive"):
        steady_rate([0.0, float("nan")])


def test_the_spread_tells_a_busy_machine_from_a_quiet_one():
    assert spread([100.0] * 7) == 0.0
    assert spread([100.0, 101.0, 99.0, 100.5, 99.5, 100.0, 100.2]) < 0.01
    assert spread([100.0, 31.0, 99.0, 24.0, 100.5, 12.0, 30.0]) > throughput.MAX_SPREAD
    assert spread([]) == 1.0


def test_a_cached_measurement_is_fresh_only_when_dated_recent_and_well_formed():
    now = 1_000_000_000.0
    good = {"inference_rps": 50.0, "forward_rps": 900.0, "measured_at": now - 3600}
    assert is_fresh(good, now)
    assert not is_fresh({**good, "measured_at": now - throughput.MAX_AGE_S - 1}, now)
    assert not is_fresh({**good, "measured_at": now + 3600}, now)  # from the future: the clock moved
    assert not is_fresh({"inference_rps": 50.0, "forward_rps": 900.0, "throughput": 50.0}, now)  # undated, old format
    assert not is_fresh({**good, "forward_rps": 0.0}, now)
    assert not is_fresh({**good, "inference_rps": "fast"}, now)
    assert not is_fresh([50.0], now)
    assert not is_fresh({**good, "max_age_s": 60.0}, now)  # a busy machine's figure, kept a minute
    assert not is_fresh({**good, "max_age_s": "forever"}, now)
    assert not is_fresh({**good, "measured_at": now - 40 * 24 * 3600, "max_age_s": 1e12}, now)  # capped


@pytest.fixture(scope="module")
def backend() -> SpanBackend:
    """Two blocks of the demo model, loaded as a block server loads them."""
    config = prepare_config(AutoConfig.from_pretrained(DEMO_MODEL))
    family = family_for(config)
    return load_span(CheckpointFiles(DEMO_MODEL), family, config, 2, 4, torch.float32, torch.device("cpu"))


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SWARM_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_a_steady_measurement_is_cached_with_its_date_and_unit_free_of_the_bandwidth(backend, cache_dir, monkeypatch):
    monkeypatch.setattr(throughput, "MAX_SPREAD", 1.0)  # this test is about caching, not about the machine's load
    rates = measure_throughput(backend, cache_key="demo|2 blocks", bandwidth_mbps=100.0)
    assert rates["throughput"] == min(rates["inference_rps"], rates["forward_rps"], rates["network_rps"])
    assert rates["network_rps"] == pytest.approx(100e6 / (backend.hidden_size * 32))
    (key, entry), *others = json.loads((cache_dir / "throughput.json").read_text()).items()
    assert not others and key.startswith("demo|2 blocks|") and "threads" in key
    assert time.time() - 60 < entry["measured_at"] <= time.time() and entry["max_age_s"] == throughput.MAX_AGE_S
    assert "network_rps" not in entry  # the bandwidth option may change between runs

    again = measure_throughput(backend, cache_key="demo|2 blocks", bandwidth_mbps=1.0)  # from the cache
    assert again["inference_rps"] == rates["inference_rps"] and again["forward_rps"] == rates["forward_rps"]
    assert again["network_rps"] == pytest.approx(rates["network_rps"] / 100)


def test_a_stale_or_old_format_cache_is_measured_again(backend, cache_dir, monkeypatch):
    monkeypatch.setattr(throughput, "MAX_SPREAD", 1.0)
    measure_throughput(backend, cache_key="demo", bandwidth_mbps=100.0)
    path = cache_dir / "throughput.json"
    cached = json.loads(path.read_text())
    (key,) = cached
    cached[key] = {"inference_rps": 76.5, "forward_rps": 76.5, "network_rps": 1.0, "throughput": 76.5}  # no date
    path.write_text(json.dumps(cached))
    rates = measure_throughput(backend, cache_key="demo", bandwidth_mbps=100.0)
    assert rates["inference_rps"] != 76.5
    assert is_fresh(json.loads(path.read_text())[key])


def test_an_unsteady_measurement_is_kept_only_briefly(backend, cache_dir, monkeypatch):
    monkeypatch.setattr(throughput, "MAX_SPREAD", -1.0)  # every measurement counts as taken on a busy machine
    rates = measure_throughput(backend, cache_key="demo", bandwidth_mbps=100.0)
    assert rates["throughput"] > 0
    (entry,) = json.loads((cache_dir / "throughput.json").read_text()).values()
    assert entry["max_age_s"] == throughput.UNSTEADY_MAX_AGE_S
    assert is_fresh(entry, entry["measured_at"] + throughput.UNSTEADY_MAX_AGE_S - 1)
    assert not is_fresh(entry, entry["measured_at"] + throughput.UNSTEADY_MAX_AGE_S + 1)


def test_no_measurement_is_cached_while_another_server_loads_weights(backend, cache_dir, monkeypatch):
    monkeypatch.setattr(throughput, "MAX_SPREAD", 1.0)
    monkeypatch.setattr(throughput, "LOCK_WAIT_S", 0.0)
    with loading_weights():  # a second file description: flock makes it another server's lock
        with throughput._lock(exclusive=True, wait_s=0.0) as alone:
            assert not alone
        rates = measure_throughput(backend, cache_key="demo", bandwidth_mbps=100.0)
    assert rates["throughput"] > 0
    assert not (cache_dir / "throughput.json").exists()
    with throughput._lock(exclusive=True, wait_s=0.0) as alone:
        assert alone
    with loading_weights(), loading_weights():  # servers loading at once do not wait for each other
        pass
