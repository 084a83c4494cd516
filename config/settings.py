"""Django settings, read from the environment.

Embedded default (no services): SQLite, Channels' in-memory layer and a Celery broker on the
filesystem. `REDIS_URL` switches Celery and Channels to Redis; `DATABASE_URL` switches the
database (e.g. to PostgreSQL).
"""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from config.env import envbool, envfloat, envint, envlist, envstr
from monitor import conf as monitor_conf  # the monitor's defaults (it reads settings only when called)
from swarm.demo_models import DEMO_DRAFT_MODEL_PATH, DEMO_MODEL_PATH, DEMO_MOE_MODEL_PATH

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(envstr("VAR_DIR", str(BASE_DIR / "var")))
VAR_DIR.mkdir(parents=True, exist_ok=True)

# The contributor commands (`manage.py runblockserver`, `rundht`, `tune`, `makedemomodel`) serve no web
# pages: they run with nothing set. Everything else (runserver, daphne, celery, `check --deploy`...) needs
# SECRET_KEY unless DEBUG is on.
ENGINE_COMMANDS = frozenset({"runblockserver", "rundht", "tune", "makedemomodel"})
_command = sys.argv[2:3] if sys.argv[1:2] == ["help"] else sys.argv[1:2]  # `manage.py help runblockserver` too
ENGINE_ONLY = Path(sys.argv[0]).name == "manage.py" and bool(_command) and _command[0] in ENGINE_COMMANDS

DEBUG = envbool("DEBUG", False)
SECRET_KEY = envstr("SECRET_KEY")
if not SECRET_KEY:
    if ENGINE_ONLY:
        SECRET_KEY = secrets.token_urlsafe(50)  # signs nothing: these commands serve no web pages
    elif not DEBUG:
        raise ImproperlyConfigured("SECRET_KEY must be set when DEBUG is off (set DEBUG=1 for development).")
    else:
        SECRET_KEY = "insecure-development-key"  # only ever used with DEBUG on

ALLOWED_HOSTS = envlist("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = envlist("CSRF_TRUSTED_ORIGINS")

INSTALLED_APPS = [
    "daphne",
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.sessions",
    "django.contrib.staticfiles",
    "channels",
    "config",
    "demos",
    "monitor",
    "playground",
]

MIDDLEWARE = [
    "config.health.HealthCheckMiddleware",  # first: health checks pass before any Host or scheme check
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"
ASGI_APPLICATION = "config.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
            ],
        },
    },
]

DATABASE_URL = envstr("DATABASE_URL", f"sqlite:///{VAR_DIR / 'db.sqlite3'}")
DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=60)}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = envstr("REDIS_URL")
if REDIS_URL:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": [REDIS_URL]}}}
    CELERY_BROKER_URL = REDIS_URL
    CELERY_RESULT_BACKEND = REDIS_URL
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    _broker_dir = VAR_DIR / "celery-broker"
    _broker_dir.mkdir(parents=True, exist_ok=True)
    (VAR_DIR / "celery-results").mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_URL = "filesystem://"
    CELERY_BROKER_TRANSPORT = "config.broker:Transport"  # kombu's, with atomic message files
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir),
        "data_folder_out": str(_broker_dir),
        "control_folder": str(_broker_dir / "control"),  # kombu's default is ./control, in the working dir
    }
    CELERY_RESULT_BACKEND = f"file://{VAR_DIR / 'celery-results'}"
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_RESULT_EXPIRES = envint("CELERY_RESULT_EXPIRES", 3600)  # seconds a task's result is kept
# Shared by every process of the site (the crawl lock, monitor/tasks.py): Redis, or a folder beside the
# embedded broker's (all those processes run on one machine).
CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}
    if REDIS_URL
    else {"BACKEND": "django.core.cache.backends.filebased.FileBasedCache", "LOCATION": str(VAR_DIR / "cache")}
}

STATIC_URL = "/static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = Path(envstr("STATIC_ROOT", str(VAR_DIR / "staticfiles")))  # the image sets its own (not a volume)
# Whitenoise serves static files from the ASGI app: from the source folders in development, from
# `collectstatic`'s hashed, compressed copies in production. `collectstatic` without DEBUG builds them
# (and the manifest); the site uses them once the manifest exists.
_MANIFEST = not DEBUG and ((STATIC_ROOT / "staticfiles.json").exists() or _command == ["collectstatic"])
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"
        if _MANIFEST
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}
WHITENOISE_USE_FINDERS = envbool("WHITENOISE_USE_FINDERS", not _MANIFEST)

# The largest request body accepted: bigger ones are refused (413) before they are read whole
# (config/bodies.py); Django's own limit on what it reads into memory is the same.
MAX_REQUEST_BODY_BYTES = envint("MAX_REQUEST_BODY_BYTES", 1024 * 1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = MAX_REQUEST_BODY_BYTES

# Reverse proxies whose X-Forwarded-For names the client (addresses or networks, e.g. 172.16.0.0/12):
# per-client limits then count clients, not the proxy. Nobody's header is believed by default.
TRUSTED_PROXIES = envlist("TRUSTED_PROXIES")

# Behind a TLS-terminating proxy (SECURE_PROXY=1): trust its scheme header, secure cookies, HSTS.
if envbool("SECURE_PROXY", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = True
    SECURE_SSL_REDIRECT = envbool("SECURE_SSL_REDIRECT", True)
    SECURE_HSTS_SECONDS = envint("SECURE_HSTS_SECONDS", 30 * 24 * 3600)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = envbool("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"stdout": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["stdout"], "level": envstr("LOG_LEVEL", "INFO")},
    "loggers": {"hivemind": {"level": envstr("HIVEMIND_LOG_LEVEL", "WARNING")}},
}

# The swarm this site and its commands join.
SWARM_INITIAL_PEERS_FILE = envstr("SWARM_INITIAL_PEERS_FILE")  # written by `rundht --maddrs-file`
SWARM_INITIAL_PEERS = envlist("SWARM_INITIAL_PEERS") or (
    Path(SWARM_INITIAL_PEERS_FILE).read_text().split()
    if SWARM_INITIAL_PEERS_FILE and Path(SWARM_INITIAL_PEERS_FILE).exists()
    else []
)
SWARM_DEMO_MODEL = envstr("SWARM_DEMO_MODEL", str(DEMO_MODEL_PATH))  # tiny Llama the demo serves
SWARM_DEMO_MOE_MODEL = envstr("SWARM_DEMO_MOE_MODEL", str(DEMO_MOE_MODEL_PATH))  # tiny Mixtral (sparse MoE) beside it
# The Llama demo's draft for speculative decoding ("" turns it off).
SWARM_DEMO_DRAFT_MODEL = envstr("SWARM_DEMO_DRAFT_MODEL", str(DEMO_DRAFT_MODEL_PATH))
SWARM_HEALTH_URL = envstr("SWARM_HEALTH_URL")
SWARM_USE_RELAY = envbool("SWARM_USE_RELAY", True)  # the site dials servers behind NAT through their relays
SWARM_REQUEST_TIMEOUT = envfloat("SWARM_REQUEST_TIMEOUT", 30.0)
SWARM_HOST_MADDRS = envlist("SWARM_HOST_MADDRS", ["/ip4/0.0.0.0/tcp/0"])
SWARM_ANNOUNCE_MADDRS = envlist("SWARM_ANNOUNCE_MADDRS")

# Playground: the chat models this site embeds a swarm client for, and the limits of its APIs.
# PLAYGROUND_MODELS is JSON, {"name": {"path": ..., "display_name": ..., ...}} (see playground/catalog.py).
import json  # noqa: E402

PLAYGROUND_MODELS = json.loads(envstr("PLAYGROUND_MODELS") or "null") or {
    "demo": {"path": SWARM_DEMO_MODEL, "display_name": "Demo (tiny Llama, 8 blocks)", "draft": SWARM_DEMO_DRAFT_MODEL},
    "demo-moe": {"path": SWARM_DEMO_MOE_MODEL, "display_name": "Demo MoE (tiny Mixtral, 8 blocks)"},
}
PLAYGROUND_MAX_LENGTH = envint("PLAYGROUND_MAX_LENGTH", 2048)  # tokens in one session (all turns)
PLAYGROUND_MAX_NEW_TOKENS = envint("PLAYGROUND_MAX_NEW_TOKENS", 1024)  # tokens in one reply
PLAYGROUND_MAX_INPUT_CHARS = envint("PLAYGROUND_MAX_INPUT_CHARS", 16000)  # characters in one request's text
PLAYGROUND_MAX_STOP_SEQUENCES = envint("PLAYGROUND_MAX_STOP_SEQUENCES", 8)
PLAYGROUND_MAX_STOP_SEQUENCE_CHARS = envint("PLAYGROUND_MAX_STOP_SEQUENCE_CHARS", 100)
PLAYGROUND_SESSIONS_PER_CLIENT = envint("PLAYGROUND_SESSIONS_PER_CLIENT", 4)  # per client IP address
PLAYGROUND_MAX_SESSIONS = envint("PLAYGROUND_MAX_SESSIONS", 64)  # per ASGI process
PLAYGROUND_STEP_TIMEOUT = envfloat("PLAYGROUND_STEP_TIMEOUT", 60.0)  # seconds to wait for the next token
PLAYGROUND_IDLE_TIMEOUT = envfloat("PLAYGROUND_IDLE_TIMEOUT", 600.0)  # seconds a socket may sit idle
PLAYGROUND_MISSING_BLOCKS_TIMEOUT = envfloat("PLAYGROUND_MISSING_BLOCKS_TIMEOUT", 10.0)
PLAYGROUND_AVAILABILITY_TTL = envfloat("PLAYGROUND_AVAILABILITY_TTL", 15.0)  # cache of live availability

# Monitor: the swarm health monitor. monitor/conf.py is the home of every MONITOR_* setting and its
# default; here the environment may override them (same names).
# MONITOR_MODELS: models always listed, besides those found in the DHT's model index. JSON, a list of
# {"dht_prefix", "num_blocks", "repository", "name"}, or compact "prefix:num_blocks[:repository[:name]]"
# entries separated by ";", e.g. "Meta-Llama-3-1-405B-Instruct-hf:126:meta-llama/Meta-Llama-3.1-405B-Instruct".
MONITOR_MODELS = envstr("MONITOR_MODELS", monitor_conf.MODELS)
MONITOR_UPDATE_PERIOD = envint("MONITOR_UPDATE_PERIOD", monitor_conf.UPDATE_PERIOD)  # seconds between crawls
MONITOR_RETENTION = envint("MONITOR_RETENTION", monitor_conf.RETENTION)  # seconds of history kept
MONITOR_PING_TIMEOUT = envfloat("MONITOR_PING_TIMEOUT", monitor_conf.PING_TIMEOUT)  # seconds per rpc_info ping
MONITOR_PING_CACHE_SECONDS = envfloat("MONITOR_PING_CACHE_SECONDS", monitor_conf.PING_CACHE_SECONDS)
MONITOR_DHT_TIMEOUT = envfloat("MONITOR_DHT_TIMEOUT", monitor_conf.DHT_TIMEOUT)  # seconds per call into the DHT
MONITOR_TASK_SOFT_TIME_LIMIT = envint("MONITOR_TASK_SOFT_TIME_LIMIT", monitor_conf.TASK_SOFT_TIME_LIMIT)
MONITOR_TASK_TIME_LIMIT = envint("MONITOR_TASK_TIME_LIMIT", monitor_conf.TASK_TIME_LIMIT)  # then killed
MONITOR_BLOCKS_PER_TASK = envint("MONITOR_BLOCKS_PER_TASK", monitor_conf.BLOCKS_PER_TASK)
MONITOR_PING_PARALLEL = envint("MONITOR_PING_PARALLEL", monitor_conf.PING_PARALLEL)
MONITOR_MAX_PINGS = envint("MONITOR_MAX_PINGS", monitor_conf.MAX_PINGS)
MONITOR_PING_BUDGET = envfloat("MONITOR_PING_BUDGET", monitor_conf.PING_BUDGET)  # seconds for a crawl's pings
MONITOR_KNOWN_GOOD_CRAWLS = envint("MONITOR_KNOWN_GOOD_CRAWLS", monitor_conf.KNOWN_GOOD_CRAWLS)
MONITOR_MAX_CUSTOM_MODELS = envint("MONITOR_MAX_CUSTOM_MODELS", monitor_conf.MAX_CUSTOM_MODELS)
MONITOR_MAX_NUM_BLOCKS = envint("MONITOR_MAX_NUM_BLOCKS", monitor_conf.MAX_NUM_BLOCKS)
MONITOR_MAX_SERVERS_PER_MODEL = envint("MONITOR_MAX_SERVERS_PER_MODEL", monitor_conf.MAX_SERVERS_PER_MODEL)
MONITOR_PUBLIC_NAME_MIN_BLOCKS = envint("MONITOR_PUBLIC_NAME_MIN_BLOCKS", monitor_conf.PUBLIC_NAME_MIN_BLOCKS)
MONITOR_PUSH_POLL_SECONDS = envfloat("MONITOR_PUSH_POLL_SECONDS", monitor_conf.PUSH_POLL_SECONDS)
MONITOR_GAP_PERIODS = envfloat("MONITOR_GAP_PERIODS", monitor_conf.GAP_PERIODS)
MONITOR_PAGE_SERVERS_PER_MODEL = envint("MONITOR_PAGE_SERVERS_PER_MODEL", monitor_conf.PAGE_SERVERS_PER_MODEL)
MONITOR_WS_PER_IP = envint("MONITOR_WS_PER_IP", monitor_conf.WS_PER_IP)  # status-page sockets per client
MONITOR_WS_TOTAL = envint("MONITOR_WS_TOTAL", monitor_conf.WS_TOTAL)  # and in all, per web process
MONITOR_REFRESH_JITTER = envfloat("MONITOR_REFRESH_JITTER", monitor_conf.REFRESH_JITTER)  # seconds
CELERY_BEAT_SCHEDULE = {
    **globals().get("CELERY_BEAT_SCHEDULE", {}),
    "monitor-crawl": {
        "task": "monitor.tasks.crawl_swarm",
        "schedule": float(MONITOR_UPDATE_PERIOD),
        "options": {"expires": float(MONITOR_UPDATE_PERIOD)},  # a crawl queued behind a slow one is dropped
    },
    "monitor-prune": {"task": "monitor.tasks.prune_history", "schedule": 3600.0},
}
