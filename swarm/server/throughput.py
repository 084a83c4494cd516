"""How fast this server is, in tokens/s through one block (Petals' "requests per second", rps).

A request is one token's hidden state through one block, so for one-token inference steps requests/s
and tokens/s are the same number:

- inference_rps: single-token steps per second through one block (with a KV cache),
- forward_rps: tokens per second through one block for long sequences (prefill, fine-tuning),
- network_rps: tokens per second the uplink can carry (from --bandwidth-mbps),
- throughput: the minimum of the three, as announced (PROTOCOL.md: requests/s for one block).

Each rate is the steady rate of several timed rounds (`steady_rate`). Servers sharing a cache folder measure
one at a time, and never while another is loading weights (`loading_weights`); a measurement and the log lines
that tell its figure stay inside that lock. Cached figures are keyed by the model, the span's length (not its
position: identical servers announce the same figure), the device (its name, for GPUs), dtype, quantization,
torch and its thread count, and expire after MAX_AGE_S.

A figure measured while the machine was busy is announced (it is what the server can do now) but cached only
for UNSTEADY_MAX_AGE_S, and reused within that time only while the machine is still busy (`busy_reasons`):
- its rounds disagreed (MAX_SPREAD),
- other processes used the cores it computes on (`contended`: their CPU time from /proc/stat, a steady load
  slows every round alike),
- it is far below the best quiet figure of the same key (FAR_BELOW_BEST).
The best quiet figure of each key is kept beside its latest one, so a busy measurement replaces neither.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from swarm.server.backend import SpanBackend

logger = logging.getLogger(__name__)

DEFAULT_BANDWIDTH_MBPS = 100.0
UNIT = "tokens/s per block"
ROUNDS = 5  # timed rounds per rate
INFERENCE_STEPS_PER_ROUND = 4
FORWARD_TOKENS = 256
MAX_SPREAD = 0.2  # rounds disagreeing by more than this (relative) mean the machine was busy
MAX_AGE_S = 30 * 24 * 3600.0  # re-measure monthly: drivers, clocks and neighbours change
UNSTEADY_MAX_AGE_S = 600.0  # a busy machine's figure: only for servers started alongside (a test run, a demo)
LOCK_WAIT_S = 600.0  # after this long waiting for other servers, measure anyway (and do not cache)
BUSY_CORES_MARGIN = 0.5  # other processes using more cores than torch leaves idle, plus this: contended
FAR_BELOW_BEST = 0.5  # a figure under this fraction of the key's best quiet one was not taken on a quiet machine
QUIET_CHECK_S = 0.5  # how long to watch the machine before reusing a figure measured while it was busy
RATES = ("inference_rps", "forward_rps")  # what is measured and cached (the network's rate is not)


def cache_path() -> Path:
    root = Path(os.environ.get("SWARM_CACHE_DIR", Path.home() / ".cache" / "swarm"))
    return root / "throughput.json"


# ----- the statistic -----


def steady_rate(samples: Sequence[float]) -> float:
    """The median of the fastest half of the rounds' rates.

    Interference (another process, a page fault, a GC pause) only ever slows a round down, so the slow half
    is dropped; the median of the rest is not fooled by one lucky round either.
    """
    rates = [rate for rate in samples if math.isfinite(rate) and rate > 0]
    if not rates:
        raise ValueError("no positive, finite rate to summarise")
    fastest = sorted(rates, reverse=True)[: (len(rates) + 1) // 2]
    return statistics.median(fastest)


def spread(samples: Sequence[float]) -> float:
    """How much slower the typical round was than the steady rate: 0 when all agree, near 1 under heavy load."""
    rates = [rate for rate in samples if math.isfinite(rate) and rate > 0]
    if not rates:
        return 1.0
    return 1.0 - statistics.median(rates) / steady_rate(rates)


def network_rps(bandwidth_mbps: float, hidden_size: int) -> float:
    """Tokens/s the uplink carries: a token's hidden state travels as hidden_size 16-bit values, in and out."""
    return bandwidth_mbps * 1e6 / (hidden_size * 16 * 2)


def is_fresh(entry: object, now: float | None = None) -> bool:
    """A cached measurement worth reusing: well-formed and younger than its max_age_s (at most MAX_AGE_S)."""
    if not isinstance(entry, dict):
        return False
    rates = [entry.get("inference_rps"), entry.get("forward_rps")]
    if not all(isinstance(rate, int | float) and math.isfinite(rate) and rate > 0 for rate in rates):
        return False
    measured_at = entry.get("measured_at")
    if not isinstance(measured_at, int | float):
        return False  # written before measurements were dated: measure again
    max_age = entry.get("max_age_s", MAX_AGE_S)
    max_age = min(max_age, MAX_AGE_S) if isinstance(max_age, int | float) else 0.0
    age = (time.time() if now is None else now) - measured_at
    return 0 <= age <= max_age


# ----- a busy machine -----


@dataclasses.dataclass(frozen=True)
class CpuSample:
    """CPU time used so far: by this process (all its threads), and by the whole machine (None: unknown)."""

    wall_s: float
    own_s: float
    machine_s: float | None

    @classmethod
    def now(cls) -> CpuSample:
        return cls(time.monotonic(), time.process_time(), _machine_busy_s())


def others_cores(before: CpuSample, after: CpuSample) -> float | None:
    """How many cores other processes kept busy on average between two samples (None: unknown)."""
    wall = after.wall_s - before.wall_s
    if before.machine_s is None or after.machine_s is None or wall <= 0:
        return None
    others = (after.machine_s - before.machine_s) - (after.own_s - before.own_s)
    return max(0.0, others / wall)


def contended(others: float | None, cpus: int, own_threads: int) -> bool:
    """Did other processes take cores this process computes on? Beyond the cores its threads leave idle,
    a parallel region waits for its slowest thread, so even one core taken slows every step."""
    return others is not None and others > max(0, cpus - own_threads) + BUSY_CORES_MARGIN


def busy_reasons(
    rates: dict, disagreement: float, others: float | None, threads: int, best: object, now: float | None = None
) -> list[str]:
    """Why a measurement may not be what this machine does when quiet (none: it is)."""
    reasons = []
    if disagreement > MAX_SPREAD:
        reasons.append(f"its rounds varied by {100 * disagreement:.0f}%")
    if contended(others, _cpus(), threads):
        reasons.append(f"other processes kept {others:.1f} of {_cpus()} cores busy")
    if is_best(best, now):
        for name in RATES:
            if rates[name] < FAR_BELOW_BEST * best[name]:
                reasons.append(f"{name} {rates[name]:.1f} is far below this device's best, {best[name]:.1f}")
    return reasons


def is_best(entry: object, now: float | None = None) -> bool:
    """A usable best quiet figure: well-formed and younger than MAX_AGE_S (clocks and drivers change)."""
    return isinstance(entry, dict) and is_fresh({**entry, "max_age_s": MAX_AGE_S}, now)


def cache_entry(rates: dict, disagreement: float, reasons: list[str], previous: object, now: float) -> dict:
    """What to cache for a measurement: kept MAX_AGE_S if taken on a quiet machine, else UNSTEADY_MAX_AGE_S;
    the best quiet figure so far goes along, raised only by a quiet measurement."""
    best = previous.get("best") if isinstance(previous, dict) else None
    best = best if is_best(best, now) else None
    if not reasons and (best is None or any(rates[name] > best[name] for name in RATES)):
        best = {name: max(rates[name], best[name] if best else 0.0) for name in RATES} | {"measured_at": now}
    entry = {
        **{name: rates[name] for name in RATES},
        "spread": round(disagreement, 3),
        "measured_at": now,
        "max_age_s": UNSTEADY_MAX_AGE_S if reasons else MAX_AGE_S,
        "busy": reasons,
    }
    return entry | {"best": best} if best is not None else entry


def measured_busy(entry: dict) -> bool:
    """Was this cached figure measured while the machine was busy? (Older entries only say so by their age.)"""
    max_age = entry.get("max_age_s", MAX_AGE_S)
    return bool(entry.get("busy")) or (isinstance(max_age, int | float) and max_age < MAX_AGE_S)


def worth_reusing(entry: object, still_busy: Callable[[], bool], now: float | None = None) -> bool:
    """A fresh cached figure; one measured while the machine was busy only while it still is (asked last: the
    answer takes QUIET_CHECK_S)."""
    return is_fresh(entry, now) and (not measured_busy(entry) or still_busy())


def _busy_now(threads: int) -> bool:
    """Are other processes using this process's cores right now (watched for QUIET_CHECK_S)?"""
    before = CpuSample.now()
    time.sleep(QUIET_CHECK_S)
    return contended(others_cores(before, CpuSample.now()), _cpus(), threads)


def _machine_busy_s() -> float | None:
    """CPU seconds all processes have used since boot (/proc/stat: all but idle and iowait), or None."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(value) for value in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _cpus() -> int:
    return os.cpu_count() or 1  # as /proc/stat counts them: the whole machine's


def _threads(device: torch.device) -> int:
    """The cores a measurement computes on: torch's threads on a CPU, the launching thread for a GPU."""
    return torch.get_num_threads() if device.type == "cpu" else 1


# ----- coordination between the servers of one machine -----


@contextlib.contextmanager
def _lock(exclusive: bool, wait_s: float | None) -> Iterator[bool]:
    """A lock next to the cache; yields whether it was taken (False: no lock file, or waited too long)."""
    path = cache_path().with_name("throughput.lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        logger.debug("No throughput lock at %s: %s", path, e)
        yield False
        return
    try:
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        taken = _acquire(fd, mode, wait_s)
        try:
            yield taken
        finally:
            if taken:
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _acquire(fd: int, mode: int, wait_s: float | None) -> bool:
    if wait_s is None:
        fcntl.flock(fd, mode)
        return True
    deadline = time.monotonic() + wait_s
    told = False
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            if not told:
                logger.info("Waiting for other servers on this machine to finish loading or measuring")
                told = True
            time.sleep(0.2)


@contextlib.contextmanager
def loading_weights() -> Iterator[None]:
    """Held while this server loads weights (shared by servers loading at once): no throughput measurement
    on this machine runs meanwhile. Also a decorator."""
    with _lock(exclusive=False, wait_s=None):
        yield


# ----- measuring -----


def measure_throughput(backend: SpanBackend, *, cache_key: str, bandwidth_mbps: float = DEFAULT_BANDWIDTH_MBPS) -> dict:
    """The rates to announce, in tokens/s per block: from the cache if worth reusing, else measured (and cached:
    for long only if the machine was quiet)."""
    key = f"{cache_key}|{_machine(backend.device)}"
    path = cache_path()
    network = network_rps(bandwidth_mbps, backend.hidden_size)
    threads = _threads(backend.device)
    with _lock(exclusive=True, wait_s=LOCK_WAIT_S) as alone:
        previous = _read_cache(path).get(key)
        if worth_reusing(previous, lambda: _busy_now(threads)):
            logger.info("Throughput for %s from cache %s", key, path)
            return _announced(previous, network)
        if is_fresh(previous):
            logger.info("The cached throughput was measured while this machine was busy; it is quiet now")
        logger.info("Measuring throughput (%d rounds; cached in %s)", ROUNDS, path)
        entry = _measure(backend, previous, threads)
        if entry["busy"]:
            logger.warning(
                "Throughput measured while the machine was busy (%s): announced, but cached for %.0f s only",
                "; ".join(entry["busy"]),
                UNSTEADY_MAX_AGE_S,
            )
        if alone:
            _write_cache(path, key, entry)
        else:
            logger.warning("Throughput measured without waiting for the other servers: not cached")
        return _announced(entry, network)  # its log line too: another server's must not come between


def _measure(backend: SpanBackend, previous: object, threads: int) -> dict:
    num_blocks = backend.end - backend.start
    before = CpuSample.now()
    inference = [rate * num_blocks for rate in _measure_inference(backend)]
    forward = [rate * num_blocks for rate in _measure_forward(backend)]
    others = others_cores(before, CpuSample.now())
    disagreement = max(spread(inference), spread(forward))
    rates = {"inference_rps": steady_rate(inference), "forward_rps": steady_rate(forward)}
    best = previous.get("best") if isinstance(previous, dict) else None
    now = time.time()
    reasons = busy_reasons(rates, disagreement, others, threads, best, now)
    return cache_entry(rates, disagreement, reasons, previous, now)


def _announced(entry: dict, network: float) -> dict[str, float]:
    rates = {"inference_rps": entry["inference_rps"], "forward_rps": entry["forward_rps"], "network_rps": network}
    rates["throughput"] = min(rates.values())
    logger.info("Throughput (%s): %s", UNIT, ", ".join(f"{name}={value:.1f}" for name, value in rates.items()))
    return rates


def _machine(device: torch.device) -> str:
    """What else the speed depends on: the GPU model, or the CPU threads torch uses."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}"
    return f"{os.cpu_count()} cpus|{torch.get_num_threads()} threads"


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, key: str, entry: dict) -> None:
    cached = _read_cache(path)  # under the lock: no other server writes meanwhile
    cached[key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(cached, indent=2))
        temporary.replace(path)  # a reader never sees half a file
    except OSError as e:
        logger.warning("Could not cache the throughput in %s: %s", path, e)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure_inference(backend: SpanBackend) -> list[float]:
    """Single-token steps per second through the whole span, one figure per round."""
    steps = ROUNDS * INFERENCE_STEPS_PER_ROUND
    cache = backend.new_cache(backend.start, backend.end - backend.start, 1, steps + 2)
    hidden = torch.randn(1, 1, backend.hidden_size)
    backend.inference_step(hidden, cache)  # warm-up
    rates = []
    for _ in range(ROUNDS):
        _synchronize(backend.device)
        began = time.perf_counter()
        for _ in range(INFERENCE_STEPS_PER_ROUND):
            backend.inference_step(hidden, cache)
        _synchronize(backend.device)
        rates.append(INFERENCE_STEPS_PER_ROUND / (time.perf_counter() - began))
    return rates


def _measure_forward(backend: SpanBackend) -> list[float]:
    """Tokens per second through the whole span for a FORWARD_TOKENS-long sequence, one figure per round."""
    hidden = torch.randn(1, FORWARD_TOKENS, backend.hidden_size)
    backend.forward(hidden, backend.start, backend.end)  # warm-up
    rates = []
    for _ in range(ROUNDS):
        _synchronize(backend.device)
        began = time.perf_counter()
        backend.forward(hidden, backend.start, backend.end)
        _synchronize(backend.device)
        rates.append(FORWARD_TOKENS / (time.perf_counter() - began))
    return rates
