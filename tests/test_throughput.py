"""The announced throughput: a steady statistic of several rounds, cached for long only when measured on a
quiet machine, one server at a time."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoConfig

from swarm.checkpoint import CheckpointFiles
from swarm.models.registry import family_for, prepare_config
from swarm.server import throughput
from swarm.server.backend import SpanBackend, load_span
from swarm.server.throughput import (
    CpuSample,
    busy_reasons,
    cache_entry,
    contended,
    is_fresh,
    loading_weights,
    measure_throughput,
    others_cores,
    spread,
    steady_rate,
    worth_reusing,
)
from tests.conftest import DEMO_MODEL, ROOT


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


@pytest.fixture
def quiet_machine(monkeypatch):
    """For tests about caching, not about the machine's load (other tests' processes share its cores)."""
    monkeypatch.setattr(throughput, "MAX_SPREAD", 1.0)
    monkeypatch.setattr(throughput, "BUSY_CORES_MARGIN", math.inf)


def test_a_steady_measurement_is_cached_with_its_date_and_unit_free_of_the_bandwidth(backend, cache_dir, quiet_machine):
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


def test_a_stale_or_old_format_cache_is_measured_again(backend, cache_dir, quiet_machine):
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


def test_no_measurement_is_cached_while_another_server_loads_weights(backend, cache_dir, quiet_machine, monkeypatch):
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


# ----- a busy machine: the figures (21.8 requests/s measured under load, 2961 when quiet) -----

NOW = 1_000_000_000.0
QUIET = {"inference_rps": 2961.0, "forward_rps": 40000.0}
UNDER_LOAD = {"inference_rps": 21.8, "forward_rps": 300.0}


def test_other_processes_cpu_time_counts_in_cores():
    before = CpuSample(wall_s=10.0, own_s=1.0, machine_s=100.0)
    after = CpuSample(wall_s=12.0, own_s=3.0, machine_s=106.0)  # the machine used 6 s, this process 2 s of them
    assert others_cores(before, after) == pytest.approx(2.0)
    assert others_cores(before, CpuSample(12.0, 3.0, None)) is None  # no /proc/stat
    assert others_cores(before, CpuSample(12.0, 3.0, 101.5)) == 0.0  # clock ticks' rounding: never negative


def test_contention_is_other_processes_on_the_cores_torch_computes_on():
    assert contended(1.9, cpus=2, own_threads=2)  # the issue: two torch processes on all cores
    assert contended(0.9, cpus=64, own_threads=64)  # one core taken: every parallel step waits for it
    assert not contended(0.2, cpus=2, own_threads=2)  # a logging daemon, the DHT process
    assert not contended(40.0, cpus=64, own_threads=16)  # others use cores torch leaves idle
    assert contended(49.0, cpus=64, own_threads=16)
    assert not contended(None, cpus=2, own_threads=2)


def test_a_figure_measured_under_load_is_kept_briefly_and_replaces_no_better_one(monkeypatch):
    monkeypatch.setattr(throughput, "_cpus", lambda: 2)
    quiet = cache_entry(QUIET, 0.01, busy_reasons(QUIET, 0.01, 0.1, 2, None, NOW), None, NOW)
    assert quiet["busy"] == [] and quiet["max_age_s"] == throughput.MAX_AGE_S
    assert quiet["best"] == {**QUIET, "measured_at": NOW}

    # Its rounds agree (0.01): the load was steady.
    reasons = busy_reasons(UNDER_LOAD, 0.01, 1.9, 2, quiet["best"], NOW + 86400)
    assert any("other processes kept 1.9 of 2 cores busy" in reason for reason in reasons)
    loaded = cache_entry(UNDER_LOAD, 0.01, reasons, quiet, NOW + 86400)
    assert loaded["max_age_s"] == throughput.UNSTEADY_MAX_AGE_S
    assert loaded["inference_rps"] == 21.8  # announced: what the server can do now
    assert loaded["best"] == quiet["best"]  # the quiet figure is still known


def test_a_figure_far_below_this_devices_best_is_kept_briefly_even_when_nothing_else_looked_busy(monkeypatch):
    monkeypatch.setattr(throughput, "_cpus", lambda: 2)
    best = {**QUIET, "measured_at": NOW}
    reasons = busy_reasons(UNDER_LOAD, 0.01, 0.0, 2, best, NOW + 60)  # e.g. no /proc/stat, or a GPU shared with others
    assert len(reasons) == 2 and all("far below this device's best" in reason for reason in reasons)
    entry = cache_entry(UNDER_LOAD, 0.01, reasons, {"best": best}, NOW + 60)
    assert entry["max_age_s"] == throughput.UNSTEADY_MAX_AGE_S and entry["best"] == best

    slightly_slower = {"inference_rps": 2000.0, "forward_rps": 30000.0}  # within FAR_BELOW_BEST: drift, not load
    assert busy_reasons(slightly_slower, 0.01, 0.0, 2, best, NOW + 60) == []
    entry = cache_entry(slightly_slower, 0.01, [], {"best": best}, NOW + 60)
    assert entry["max_age_s"] == throughput.MAX_AGE_S and entry["best"] == best  # not lowered

    faster = {"inference_rps": 3500.0, "forward_rps": 30000.0}
    assert cache_entry(faster, 0.01, [], {"best": best}, NOW + 60)["best"] == {
        "inference_rps": 3500.0,
        "forward_rps": 40000.0,
        "measured_at": NOW + 60,
    }


def test_the_best_figure_ages_like_a_cached_one(monkeypatch):
    """A device that became slower for good (clocks, drivers) is trusted again once its old best has expired."""
    monkeypatch.setattr(throughput, "_cpus", lambda: 2)
    old_best = {**QUIET, "measured_at": NOW - throughput.MAX_AGE_S - 1}
    slower = {"inference_rps": 1000.0, "forward_rps": 15000.0}
    assert busy_reasons(slower, 0.01, 0.0, 2, old_best, NOW) == []
    entry = cache_entry(slower, 0.01, [], {"best": old_best}, NOW)
    assert entry["max_age_s"] == throughput.MAX_AGE_S and entry["best"] == {**slower, "measured_at": NOW}
    malformed = {"inference_rps": "fast", "forward_rps": 1.0, "measured_at": NOW}
    assert busy_reasons(slower, 0.01, 0.0, 2, malformed, NOW) == []


def test_a_figure_measured_on_a_busy_machine_is_reused_only_while_it_still_is():
    def not_asked() -> bool:
        raise AssertionError("a quiet figure needs no look at the machine")

    quiet = cache_entry(QUIET, 0.01, [], None, NOW)
    assert worth_reusing(quiet, not_asked, NOW + 3600)
    loaded = cache_entry(UNDER_LOAD, 0.01, ["other processes kept 1.9 of 2 cores busy"], quiet, NOW)
    assert worth_reusing(loaded, lambda: True, NOW + 60)  # servers started alongside: the same load
    assert not worth_reusing(loaded, lambda: False, NOW + 60)  # the load is gone: measure again
    assert not worth_reusing(loaded, lambda: True, NOW + throughput.UNSTEADY_MAX_AGE_S + 1)
    older = {**UNDER_LOAD, "measured_at": NOW, "max_age_s": throughput.UNSTEADY_MAX_AGE_S}  # before "busy" was kept
    assert not worth_reusing(older, lambda: False, NOW + 60)
    assert not worth_reusing(None, lambda: True, NOW)


HOG = "import sys; print('hogging', flush=True); sys.stdout.close()\nwhile True: pass"


def test_a_measurement_while_other_processes_compute_is_cached_only_briefly(backend, cache_dir, monkeypatch):
    monkeypatch.setattr(throughput, "MAX_SPREAD", 1.0)  # a steady load: the rounds may well agree
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count())  # every core is torch's: another process on any of them slows it
    hogs = [subprocess.Popen([sys.executable, "-c", HOG], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        assert all(hog.stdout.readline() == "hogging\n" for hog in hogs)
        rates = measure_throughput(backend, cache_key="demo", bandwidth_mbps=100.0)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
        torch.set_num_threads(threads)
    assert rates["throughput"] > 0
    (entry,) = json.loads((cache_dir / "throughput.json").read_text()).values()
    assert entry["max_age_s"] == throughput.UNSTEADY_MAX_AGE_S
    assert any("other processes kept" in reason for reason in entry["busy"]), entry["busy"]
    assert "best" not in entry  # nothing quiet measured yet


# ----- one server at a time -----

SERVER = """
import json, logging, os, sys, time
import torch
from swarm.server.throughput import measure_throughput

events_path, key, go = sys.argv[1:]

def event(what, created=None):
    with open(events_path, "a") as events:
        events.write(json.dumps([os.getpid(), created or time.time(), what]) + "\\n")

class Events(logging.Handler):
    def emit(self, record):
        event(record.getMessage(), record.created)

class SlowBlocks:  # a span whose every step takes a while, as on a slow machine
    start, end, hidden_size, device = 0, 2, 8, torch.device("cpu")
    forwards = 0
    def new_cache(self, *args):
        return None
    def inference_step(self, hidden, cache):
        time.sleep(0.02)
    def forward(self, hidden, start, end):
        time.sleep(0.02)

make_record = logging.getLogRecordFactory()
def descheduled(name, level, fn, lno, msg, *args, **kwargs):
    if str(msg).startswith("Throughput ("):  # a busy machine may stop a server anywhere: here, as it logs its figure
        time.sleep(1.0)
    return make_record(name, level, fn, lno, msg, *args, **kwargs)
logging.setLogRecordFactory(descheduled)
logging.getLogger().addHandler(Events())
logging.getLogger().setLevel(logging.INFO)

event("ready")
while not os.path.exists(go):
    time.sleep(0.01)
measure_throughput(SlowBlocks(), cache_key=key)
"""


def test_servers_sharing_a_cache_measure_one_at_a_time_and_say_so_in_that_order(tmp_path):
    """In the demo, two servers' logs showed their measurements overlapping: the lock held, but a server
    logged its figure after letting the next one in (and a busy machine may stop it in between)."""
    events, go = tmp_path / "events.jsonl", tmp_path / "go"
    env = {**os.environ, "SWARM_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    servers = [
        subprocess.Popen([sys.executable, "-c", SERVER, str(events), key, str(go)], env=env, cwd=ROOT)
        for key in ("llama|4 blocks", "moe|8 blocks")  # two figures to measure: one each
    ]
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and sum(line.endswith('"ready"]') for line in _lines(events)) < 2:
            assert all(server.poll() is None for server in servers)
            time.sleep(0.05)
        go.touch()
        assert [server.wait(120) for server in servers] == [0, 0]
    finally:
        for server in servers:
            server.kill()
    spans: dict[int, list[float]] = {}
    for pid, created, what in (json.loads(line) for line in _lines(events)):
        if what.startswith("Measuring throughput") or what.startswith("Throughput ("):
            spans.setdefault(pid, []).append(created)
    (first, second) = sorted(spans.values())
    assert len(first) == len(second) == 2  # each measured, then logged its figure
    assert first[1] < second[0], "the second server started measuring before the first had told its figure"


def _lines(path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []
