"""The monitor's settings: the one home of their defaults. config/settings.py only lets the environment
override them (same names); a settings module may set any of them too. Nothing here imports the rest of
the monitor: crawl, tasks, views and APIs import this module, never the other way round.

- MONITOR_MODELS: models always listed (see monitor.targets.parse_models_setting)
- MONITOR_UPDATE_PERIOD (60): seconds between crawls (Celery beat)
- MONITOR_RETENTION (7 days): seconds of history kept (pruned hourly)
- MONITOR_PING_TIMEOUT (5): seconds an rpc_info ping may take
- MONITOR_PING_CACHE_SECONDS (300): how long a worker reuses a ping result
- MONITOR_DHT_TIMEOUT (120): seconds one call into the DHT (a read, a batch of pings) may take; past it
  the task fails and its worker process starts a new DHT client
- MONITOR_TASK_SOFT_TIME_LIMIT (300), MONITOR_TASK_TIME_LIMIT (360): seconds a Celery task may run before
  it is interrupted (soft), then before its worker process is killed (hard; its DHT process exits with it)
- MONITOR_BLOCKS_PER_TASK (32): a larger model is crawled in block ranges, one Celery task each
- MONITOR_PING_PARALLEL (128): pings in flight per worker
- MONITOR_MAX_PINGS (5000): servers pinged per crawl (per part when fanned out; answers from the ping
  cache are free); the rest are recorded as not checked ("unknown", not online) and pinged by later crawls
- MONITOR_PING_BUDGET (30): seconds all pings of a crawl (of a part, and of the final step) may take
  together; what has not answered by then is not checked, and the crawl keeps what did answer
- MONITOR_KNOWN_GOOD_CRAWLS (10): a server that answered the monitor's ping in any of this many latest
  crawls is "known good": pinged first, kept first under the per-model cap, and it ranks its model
  among the indexed ones
- MONITOR_MAX_CUSTOM_MODELS (10), MONITOR_MAX_NUM_BLOCKS (1000): bounds on models taken from the index
- MONITOR_MAX_SERVERS_PER_MODEL (2000): servers stored per model and crawl; the rest are counted. With
  the model caps this bounds one crawl's rows: (configured + custom models) x 2000, e.g. 24,000 for the
  2 demo models and 10 indexed ones (bench/bench_crawl.py --servers 20000 --models 10 keeps every server)
- MONITOR_PUBLIC_NAME_MIN_BLOCKS (10): a server's public name shows if it holds this many blocks
  (or half the model)
- MONITOR_PUSH_POLL_SECONDS (3): with the in-memory channel layer, how often open pages' sockets
  look for a new snapshot in the database
- MONITOR_GAP_PERIODS (2.5): crawls further apart than this many update periods leave a gap in the
  history (nothing ran: no coverage, no availability), and a latest snapshot this old is stale
- MONITOR_PAGE_SERVERS_PER_MODEL (100): servers the status page lists per model, verified ones first;
  the rest are counted and linked (the model page, the JSON API lists them all)
- MONITOR_WS_PER_IP (20), MONITOR_WS_TOTAL (5000): open status-page sockets per client address (an IPv6
  /64) and in all, per web process; one more is closed at once (code 4429)
- MONITOR_REFRESH_JITTER (5): at most this many seconds an open page waits, at random, before fetching a
  new snapshot (spreads the fetches of many open pages)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from monitor.targets import ModelTarget, parse_models_setting

# The defaults, one per setting (the setting is MONITOR_ + the name).
MODELS = "demo_model-hf:8::Demo model;demo_moe_model:8::Demo MoE model"
UPDATE_PERIOD = 60
RETENTION = 7 * 24 * 3600
PING_TIMEOUT = 5.0
PING_CACHE_SECONDS = 300.0
DHT_TIMEOUT = 120.0
TASK_SOFT_TIME_LIMIT = 300
TASK_TIME_LIMIT = 360
BLOCKS_PER_TASK = 32
PING_PARALLEL = 128
MAX_PINGS = 5000
PING_BUDGET = 30.0
KNOWN_GOOD_CRAWLS = 10
MAX_CUSTOM_MODELS = 10
MAX_NUM_BLOCKS = 1000
MAX_SERVERS_PER_MODEL = 2000
PUBLIC_NAME_MIN_BLOCKS = 10
PUSH_POLL_SECONDS = 3.0
GAP_PERIODS = 2.5
PAGE_SERVERS_PER_MODEL = 100
WS_PER_IP = 20
WS_TOTAL = 5000
REFRESH_JITTER = 5.0


def setting(name: str) -> Any:
    """MONITOR_<name>: from the settings module if set there, else its default above."""
    return getattr(settings, f"MONITOR_{name}", globals()[name])


@dataclasses.dataclass(frozen=True)
class CrawlOptions:
    """How one crawl runs (monitor.crawl takes it; `crawl_options()` fills it from the settings)."""

    ping: bool = True
    ping_timeout: float = PING_TIMEOUT
    ping_parallel: int = PING_PARALLEL
    max_pings: int = MAX_PINGS  # per crawl (per part when Celery fans it out); the rest are not checked
    ping_budget: float = PING_BUDGET  # seconds for all pings of one crawl (or one part)
    blocks_per_part: int = BLOCKS_PER_TASK
    max_custom_models: int = MAX_CUSTOM_MODELS
    max_num_blocks: int = MAX_NUM_BLOCKS
    max_servers_per_model: int = MAX_SERVERS_PER_MODEL
    dht_timeout: float = DHT_TIMEOUT  # seconds one call into the DHT process may take


def configured_models() -> list[ModelTarget]:
    try:
        return parse_models_setting(setting("MODELS"))
    except ValueError as e:
        raise ImproperlyConfigured(str(e)) from e


def crawl_options(*, ping: bool = True) -> CrawlOptions:
    return CrawlOptions(
        ping=ping,
        ping_timeout=float(setting("PING_TIMEOUT")),
        ping_parallel=int(setting("PING_PARALLEL")),
        max_pings=int(setting("MAX_PINGS")),
        ping_budget=float(setting("PING_BUDGET")),
        blocks_per_part=int(setting("BLOCKS_PER_TASK")),
        max_custom_models=int(setting("MAX_CUSTOM_MODELS")),
        max_num_blocks=int(setting("MAX_NUM_BLOCKS")),
        max_servers_per_model=int(setting("MAX_SERVERS_PER_MODEL")),
        dht_timeout=float(setting("DHT_TIMEOUT")),
    )


def task_time_limits() -> tuple[float, float]:
    """(soft, hard) time limits of the monitor's Celery tasks, in seconds."""
    soft, hard = float(setting("TASK_SOFT_TIME_LIMIT")), float(setting("TASK_TIME_LIMIT"))
    if not 0 < soft < hard:
        raise ImproperlyConfigured(
            f"MONITOR_TASK_SOFT_TIME_LIMIT ({soft:g}) must be positive and less than MONITOR_TASK_TIME_LIMIT ({hard:g})"
        )
    return soft, hard


def update_period() -> int:
    return int(setting("UPDATE_PERIOD"))


def gap_seconds() -> float:
    """Crawls further apart than this leave a gap; a latest snapshot older than this is stale."""
    return float(setting("GAP_PERIODS")) * update_period()


def retention_seconds() -> int:
    return int(setting("RETENTION"))


def known_good_crawls() -> int:
    return int(setting("KNOWN_GOOD_CRAWLS"))


def ping_cache_seconds() -> float:
    return float(setting("PING_CACHE_SECONDS"))


def public_name_min_blocks() -> int:
    return int(setting("PUBLIC_NAME_MIN_BLOCKS"))


def push_poll_seconds() -> float:
    return float(setting("PUSH_POLL_SECONDS"))


def page_servers_per_model() -> int:
    return max(int(setting("PAGE_SERVERS_PER_MODEL")), 0)


def websocket_caps() -> tuple[int, int]:
    """(per client, in all) open status-page sockets of one web process."""
    return int(setting("WS_PER_IP")), int(setting("WS_TOTAL"))


def refresh_jitter() -> float:
    return max(float(setting("REFRESH_JITTER")), 0.0)


def initial_peers() -> list[str]:
    return list(getattr(settings, "SWARM_INITIAL_PEERS", []))


def local_models() -> list[Path]:
    """Checkpoint folders this site knows (the demo's), relative to the project when inside it, for the
    "contribute a server" command."""
    root = Path(getattr(settings, "BASE_DIR", "."))
    paths = [
        Path(value) for name in ("SWARM_DEMO_MODEL", "SWARM_DEMO_MOE_MODEL") if (value := getattr(settings, name, ""))
    ]
    return [path.relative_to(root) if path.is_relative_to(root) else path for path in paths]
