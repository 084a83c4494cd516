"""The monitor's settings, read with their defaults. Those marked (env) are in config/settings.py under
`# Monitor` and come from the environment; the others can be set in a settings module.

- MONITOR_MODELS (env): models always listed (see monitor.targets.parse_models_setting)
- MONITOR_UPDATE_PERIOD (env, 60): seconds between crawls (Celery beat)
- MONITOR_RETENTION (env, 7 days): seconds of history kept (pruned hourly)
- MONITOR_PING_TIMEOUT (env, 5): seconds an rpc_info ping may take
- MONITOR_PING_CACHE_SECONDS (env, 300): how long a worker reuses a ping result
- MONITOR_BLOCKS_PER_TASK (env, 32): a larger model is crawled in block ranges, one Celery task each
- MONITOR_PING_PARALLEL (128): pings in flight per worker
- MONITOR_MAX_PINGS (5000): servers pinged per crawl; the rest are recorded as not checked
- MONITOR_MAX_CUSTOM_MODELS (20), MONITOR_MAX_NUM_BLOCKS (1000): bounds on models taken from the index
- MONITOR_MAX_SERVERS_PER_MODEL (5000): servers stored per model and crawl; the rest are counted
- MONITOR_PUBLIC_NAME_MIN_BLOCKS (10): a server's public name shows if it holds this many blocks
  (or half the model)
- MONITOR_PUSH_POLL_SECONDS (3): with the in-memory channel layer, how often open pages' sockets
  look for a new snapshot in the database
"""

from __future__ import annotations

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from monitor.crawl import CrawlOptions
from monitor.targets import ModelTarget, parse_models_setting


def configured_models() -> list[ModelTarget]:
    try:
        return parse_models_setting(getattr(settings, "MONITOR_MODELS", []))
    except ValueError as e:
        raise ImproperlyConfigured(str(e)) from e


def crawl_options(*, ping: bool = True) -> CrawlOptions:
    defaults = CrawlOptions()
    return CrawlOptions(
        ping=ping,
        ping_timeout=float(getattr(settings, "MONITOR_PING_TIMEOUT", defaults.ping_timeout)),
        ping_parallel=int(getattr(settings, "MONITOR_PING_PARALLEL", defaults.ping_parallel)),
        max_pings=int(getattr(settings, "MONITOR_MAX_PINGS", defaults.max_pings)),
        blocks_per_part=int(getattr(settings, "MONITOR_BLOCKS_PER_TASK", defaults.blocks_per_part)),
        max_custom_models=int(getattr(settings, "MONITOR_MAX_CUSTOM_MODELS", defaults.max_custom_models)),
        max_num_blocks=int(getattr(settings, "MONITOR_MAX_NUM_BLOCKS", defaults.max_num_blocks)),
        max_servers_per_model=int(getattr(settings, "MONITOR_MAX_SERVERS_PER_MODEL", defaults.max_servers_per_model)),
    )


def update_period() -> int:
    return int(getattr(settings, "MONITOR_UPDATE_PERIOD", 60))


def retention_seconds() -> int:
    return int(getattr(settings, "MONITOR_RETENTION", 7 * 24 * 3600))


def ping_cache_seconds() -> float:
    return float(getattr(settings, "MONITOR_PING_CACHE_SECONDS", 300.0))


def public_name_min_blocks() -> int:
    return int(getattr(settings, "MONITOR_PUBLIC_NAME_MIN_BLOCKS", 10))


def push_poll_seconds() -> float:
    return float(getattr(settings, "MONITOR_PUSH_POLL_SECONDS", 3.0))


def initial_peers() -> list[str]:
    return list(getattr(settings, "SWARM_INITIAL_PEERS", []))
