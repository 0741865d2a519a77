"""Settings for chatproject, driven by environment variables.

Every value has a default that runs as-is on a fresh machine: SQLite, the in-memory
channel layer and the built-in demo model. A deployment sets ``SECRET_KEY``,
``DEBUG=0``, ``ALLOWED_HOSTS``, ``DATABASE_URL``, ``REDIS_URL`` and the ``OPENAI_*``
variables; ``chat.checks`` warns when a combination is unsafe for production.
"""

import json
import os
from decimal import Decimal
from pathlib import Path

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent


def env_str(name: str, default: str = "") -> str:
    """Return the environment variable ``name`` stripped, or ``default`` when unset/empty."""
    value = os.environ.get(name, "").strip()
    return value or default


def env_bool(name: str, default: bool = False) -> bool:
    """Read a boolean: 1/true/yes/on are true, 0/false/no/off are false (case-insensitive).

    Raises ValueError for anything else, so a typo fails at start-up instead of silently
    meaning "false".
    """
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"{name}={value!r} is not a boolean (use 1/0, true/false)")


def env_int(name: str, default: int) -> int:
    """Read an integer; raises ValueError naming the variable when it does not parse."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def env_float(name: str, default: float) -> float:
    """Read a float; raises ValueError naming the variable when it does not parse."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a number") from None


def env_decimal(name: str) -> Decimal | None:
    """Read a non-negative decimal amount, or None when unset; raises ValueError naming
    the variable when it does not parse or is negative."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        amount = Decimal(value)
    except ArithmeticError:
        raise ValueError(f"{name}={value!r} is not a decimal number") from None
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"{name}={value!r} must be a non-negative amount")
    return amount


def env_list(name: str, default: list[str]) -> list[str]:
    """Read a comma-separated list, dropping empty items."""
    value = os.environ.get(name, "")
    if not value.strip():
        return list(default)
    return [item.strip() for item in value.split(",") if item.strip()]


# The development key is only used while SECRET_KEY is unset; chat.checks flags it
# when DEBUG is off.
INSECURE_DEV_SECRET_KEY = "django-insecure-dev-only-change-me"
SECRET_KEY = env_str("SECRET_KEY", INSECURE_DEV_SECRET_KEY)
DEBUG = env_bool("DEBUG", True)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    # daphne first so that `manage.py runserver` serves the ASGI application.
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "channels",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "chat",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "chatproject.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

WSGI_APPLICATION = None
ASGI_APPLICATION = "chatproject.asgi.application"

# --- Database -------------------------------------------------------------------------
# SQLite in WAL mode with IMMEDIATE transactions: writers take the lock at BEGIN, so two
# concurrent "start a generation" transactions serialise instead of failing with
# "database is locked" on upgrade (Django 5.1+ `transaction_mode`, SQLite docs on WAL).
# Applied to every SQLite database below, however configured: DATABASE_URL=sqlite:///
# without them ran in journal mode `delete` and failed under churn (issue 9, item 4).
SQLITE_OPTIONS = {
    "transaction_mode": "IMMEDIATE",
    "timeout": env_int("SQLITE_BUSY_TIMEOUT_S", 20),
    "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
}
DATABASE_URL = env_str("DATABASE_URL")
# Persistent connections, SQLite and PostgreSQL alike: each thread keeps its connection
# for DATABASE_CONN_MAX_AGE s (0: closed after every request and every
# database_sync_to_async call, as Django's default does). Channels closes "old"
# connections around every database_sync_to_async call, so with 0 every query of a start
# opened a connection (PostgreSQL: a backend; SQLite: the file, its PRAGMAs, Django's
# functions) and closed it: 10 % of a worker's CPU at K = 200 (docs/performance.md, "The
# cost of a start"). A worker holds one connection per executor thread (a handful).
DATABASE_CONN_MAX_AGE = env_int("DATABASE_CONN_MAX_AGE", 60)
# Before a kept connection is reused after a pause, Django checks it still works (one
# `SELECT 1` on PostgreSQL, nothing on SQLite), so a restarted database server costs no
# failed request. 0 saves that round trip and lets the first query after a restart fail.
DATABASE_CONN_HEALTH_CHECKS = env_bool("DATABASE_CONN_HEALTH_CHECKS", True)
if DATABASE_URL:
    DATABASES = {
        "default": dj_database_url.parse(
            DATABASE_URL,
            conn_max_age=DATABASE_CONN_MAX_AGE,
            conn_health_checks=DATABASE_CONN_HEALTH_CHECKS,
        )
    }
    # Lets parallel test runs (and developers' worktrees) use distinct test databases.
    DATABASES["default"]["TEST"] = {"NAME": env_str("DATABASE_TEST_NAME") or None}
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": env_str("SQLITE_PATH", str(BASE_DIR / "db.sqlite3")),
            "CONN_MAX_AGE": DATABASE_CONN_MAX_AGE,
            "CONN_HEALTH_CHECKS": DATABASE_CONN_HEALTH_CHECKS,
            # A file, not :memory:, so live server processes in tests share it.
            "TEST": {"NAME": env_str("SQLITE_TEST_PATH", str(BASE_DIR / ".test-db.sqlite3"))},
        }
    }
for _database in DATABASES.values():
    if _database["ENGINE"] == "django.db.backends.sqlite3":
        # Options given in the URL's query string win.
        _database["OPTIONS"] = {**SQLITE_OPTIONS, **_database.get("OPTIONS", {})}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Channel layer --------------------------------------------------------------------
REDIS_URL = env_str("REDIS_URL")
# "pubsub" (default): channels-redis RedisPubSubChannelLayer publishing in batches
# (chat.pubsub); "pubsub-plain": the stock layer, one locked round trip per message
# (collapsed past K = 200 streams: docs/scale.md); "core": RedisChannelLayer.
# Measured in docs/scale.md: the core layer pops one message per Redis round trip per
# process and drops silently over `capacity`; pubsub lost nothing at the same load.
CHANNEL_LAYER = env_str("CHANNEL_LAYER", "pubsub")
if CHANNEL_LAYER not in {"pubsub", "pubsub-plain", "core"}:
    raise ValueError(
        f"CHANNEL_LAYER={CHANNEL_LAYER!r} is not 'pubsub', 'pubsub-plain' or 'core'")
# redis-py 8 times reads out after 5 s by default, exactly the time channels-redis blocks
# in BZPOPMIN (core layer): every idle receive (a consumer, a generation's stop listener)
# then died with TimeoutError.
REDIS_HOST = {"address": REDIS_URL, "socket_timeout": 30}
if REDIS_URL and CHANNEL_LAYER.startswith("pubsub"):
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": ("chat.pubsub.BatchingPubSubChannelLayer" if CHANNEL_LAYER == "pubsub"
                        else "channels_redis.pubsub.RedisPubSubChannelLayer"),
            "CONFIG": {"hosts": [REDIS_HOST], "prefix": env_str("CHANNEL_PREFIX", "asgi")},
        }
    }
elif REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                "hosts": [REDIS_HOST],
                "prefix": env_str("CHANNEL_PREFIX", "asgi"),
                # The capacity is per channel, and all sockets of a process share one
                # Redis list: over it, messages are dropped silently (seq gaps, then
                # repaired by a fresh state frame).
                "capacity": env_int("CHANNEL_CAPACITY", 1000),
                "expiry": 60,
                "group_expiry": 86400,
            },
        }
    }
else:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels.layers.InMemoryChannelLayer",
            "CONFIG": {"capacity": env_int("CHANNEL_CAPACITY", 1000)},
        }
    }

# --- Auth -----------------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "chat:index"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

# --- Static files (whitenoise) --------------------------------------------------------
STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = BASE_DIR / "staticfiles"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": (
            "django.contrib.staticfiles.storage.StaticFilesStorage"
            if DEBUG
            else "chatproject.storage.StaticStorage"
        )
    },
}

# --- REST framework -------------------------------------------------------------------
REST_FRAMEWORK = {
    # Token first: anonymous requests then answer 401 with WWW-Authenticate: Token.
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "chat.api.authentication.ApiTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    # The API takes JSON bodies only (scripts and the page's JavaScript send JSON).
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Chat API",
    "DESCRIPTION": "History, usage and streaming generations of the chat application.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # Separate request/response components, so read-only fields are not asked for.
    "COMPONENT_SPLIT_REQUEST": True,
}

# --- Chat / LLM -----------------------------------------------------------------------
# With no OPENAI_API_KEY and no OPENAI_BASE_URL the built-in demo model is used: an
# OpenAI-compatible streaming server started on a loopback port inside the process, and
# reached through the same `openai` SDK path as a real provider.
OPENAI_API_KEY = env_str("OPENAI_API_KEY")
OPENAI_BASE_URL = env_str("OPENAI_BASE_URL")
# Backstop of the SDK (httpx) for each read and write of a request (s).
OPENAI_TIMEOUT_S = env_float("OPENAI_TIMEOUT_S", 60.0)
# The provider must connect and send its response headers within this (s), retries
# included; a server that hangs before answering fails the run after this long.
OPENAI_FIRST_BYTE_TIMEOUT_S = env_float("OPENAI_FIRST_BYTE_TIMEOUT_S", 20.0)
# A stream that sends nothing for this long (s) ends the run as failed.
CHAT_STREAM_IDLE_TIMEOUT_S = env_float("CHAT_STREAM_IDLE_TIMEOUT_S", 60.0)
# After a run without usage, how long (s) the provider's tokenizer may take to count its
# text (llama.cpp/vLLM POST /tokenize; issue 12); past it the usage is estimated.
CHAT_TOKENIZE_TIMEOUT_S = env_float("CHAT_TOKENIZE_TIMEOUT_S", 2.0)
# OpenRouter's record of a generation (GET /api/v1/generation) appears a few seconds after
# it ends: first ask after this many s, doubling, for this long in all.
CHAT_USAGE_LOOKUP_FIRST_DELAY_S = env_float("CHAT_USAGE_LOOKUP_FIRST_DELAY_S", 1.0)
CHAT_USAGE_LOOKUP_WINDOW_S = env_float("CHAT_USAGE_LOOKUP_WINDOW_S", 60.0)
OPENAI_MAX_RETRIES = env_int("OPENAI_MAX_RETRIES", 1)
# What the provider is sent and where its reasoning and usage are read
# (chat.generation.providers, docs/providers.md): auto (from OPENAI_BASE_URL, else asked
# of the server once), openai, vllm, ollama, llamacpp, openrouter or deepseek.
OPENAI_PROVIDER = env_str("OPENAI_PROVIDER", "auto").strip().lower()
CHAT_DEMO_MODE = not OPENAI_API_KEY and not OPENAI_BASE_URL
DEMO_MODEL_NAME = "demo"
CHAT_MODEL = env_str("CHAT_MODEL", DEMO_MODEL_NAME if CHAT_DEMO_MODE else "gpt-4o-mini")
# Models a conversation may pick; the default model is always allowed.
CHAT_MODELS = env_list("CHAT_MODELS", [CHAT_MODEL])
if CHAT_MODEL not in CHAT_MODELS:
    CHAT_MODELS.insert(0, CHAT_MODEL)
CHAT_SYSTEM_PROMPT = env_str("CHAT_SYSTEM_PROMPT", "You are a helpful assistant.")
# Tokens the model may read (prompt) plus write (max_tokens); history is trimmed from the
# oldest message to fit CHAT_CONTEXT_TOKENS - CHAT_MAX_TOKENS.
CHAT_CONTEXT_TOKENS = env_int("CHAT_CONTEXT_TOKENS", 16384)
CHAT_MAX_TOKENS = env_int("CHAT_MAX_TOKENS", 1024)
CHAT_MAX_MESSAGE_CHARS = env_int("CHAT_MAX_MESSAGE_CHARS", 32000)
# A run's upstream reader is woken this many ms after its first unread chunk, with every
# chunk of that time, instead of once per chunk (chat.generation.netstream); 0 wakes it
# per chunk. At 20 tokens/s a wake then carries a few tokens: one task step, one delta
# frame and one socket write per batch instead of per token (CPU per 1000 tokens at
# K = 200: 0.19 s per chunk, 0.12-0.15 s at 60-100 ms; docs/performance.md, "Batched
# reads"). A stop still returns what is buffered before it closes the stream.
CHAT_UPSTREAM_READ_TICK_MS = env_int("CHAT_UPSTREAM_READ_TICK_MS", 80)
# Deltas are coalesced over this window (ms) instead of one frame per token; the read
# tick above already batches a run's text, so by default a batch goes out as it is read.
CHAT_DELTA_COALESCE_MS = env_int("CHAT_DELTA_COALESCE_MS", 0)
# ... and sent at once, whatever the window, when this many characters are pending.
CHAT_DELTA_MAX_CHARS = env_int("CHAT_DELTA_MAX_CHARS", 2000)
# Frames a generation may queue for the channel layer before it waits for them to be sent.
CHAT_OUTBOX_LIMIT = env_int("CHAT_OUTBOX_LIMIT", 64)
# Frames one socket may have waiting (chat.generation.fanout.Inbox); past it the socket
# drops them and resynchronises from a fresh state frame instead of holding more.
CHAT_INBOX_LIMIT = env_int("CHAT_INBOX_LIMIT", 1000)
# Admission control (chat.generation.admission; docs/scale.md): new generations are
# refused with `overloaded` (HTTP 503) when this worker runs this many (0 = no limit) ...
CHAT_MAX_STREAMS_PER_WORKER = env_int("CHAT_MAX_STREAMS_PER_WORKER", 0)
# ... or when this many starts wait for their transaction (0 = no limit) ...
CHAT_MAX_PENDING_STARTS = env_int("CHAT_MAX_PENDING_STARTS", 0)
# ... or when the oldest of them has waited longer than this (ms, 0 = off) ...
CHAT_MAX_START_WAIT_MS = env_int("CHAT_MAX_START_WAIT_MS", 2000)
# ... or when its event loop runs late by more than this, standing, on average (ms, 0 = off)
CHAT_MAX_LOOP_LAG_MS = env_int("CHAT_MAX_LOOP_LAG_MS", 50)
# ... or when its event loop is busy more than this share of the time (%, 0 = off) ...
CHAT_MAX_LOOP_BUSY_PCT = env_int("CHAT_MAX_LOOP_BUSY_PCT", 0)
# ... and tell the client to try again after this long (ms, times 1 to 1.5 at random).
CHAT_OVERLOAD_RETRY_MS = env_int("CHAT_OVERLOAD_RETRY_MS", 2000)
# The streaming assistant message is written to the database at least this often (ms).
CHAT_CHECKPOINT_MS = env_int("CHAT_CHECKPOINT_MS", 1000)
# A `streaming` message whose heartbeat is older than this (s) belongs to a dead process.
CHAT_LEASE_S = env_int("CHAT_LEASE_S", 15)
# Every worker process looks for expired leases this often (s, jittered +-50%; 0 = off).
CHAT_SWEEP_S = env_float("CHAT_SWEEP_S", 5.0)
# Automatic stops (chat.generation.autostop; README, "Automatic stops"). Off unless set; a
# conversation may set its own (tighter) ceilings and turn the guard on or off.
CHAT_REPETITION_GUARD = env_bool("CHAT_REPETITION_GUARD", False)
# The guard stops an answer when the same CHAT_REPETITION_NGRAM words in a row occur
# more than CHAT_REPETITION_MAX_REPEATS times within its last CHAT_REPETITION_WINDOW
# words, or the same non-empty line comes more than CHAT_REPETITION_MAX_LINE_REPEATS
# times in a row.
CHAT_REPETITION_NGRAM = env_int("CHAT_REPETITION_NGRAM", 8)
CHAT_REPETITION_MAX_REPEATS = env_int("CHAT_REPETITION_MAX_REPEATS", 5)
CHAT_REPETITION_WINDOW = env_int("CHAT_REPETITION_WINDOW", 400)
CHAT_REPETITION_MAX_LINE_REPEATS = env_int("CHAT_REPETITION_MAX_LINE_REPEATS", 5)
# Per-answer ceilings: USD (prompt plus answer at the model's prices) and answer tokens;
# unset or 0: none.
CHAT_MAX_ANSWER_USD = env_decimal("CHAT_MAX_ANSWER_USD") or None
CHAT_MAX_ANSWER_TOKENS = env_int("CHAT_MAX_ANSWER_TOKENS", 0) or None
if CHAT_MAX_ANSWER_TOKENS is not None and CHAT_MAX_ANSWER_TOKENS < 0:
    raise ValueError(f"CHAT_MAX_ANSWER_TOKENS={CHAT_MAX_ANSWER_TOKENS} must not be negative")
# Tokens per second of the built-in demo model.
DEMO_TOKENS_PER_SECOND = env_float("DEMO_TOKENS_PER_SECOND", 25.0)

# USD per 1M input / output tokens, by model name or prefix (longest prefix wins).
# Override with CHAT_MODEL_PRICES='{"my-model": [0.5, 1.5]}' (input, output); a third
# price is the cached input's (absent: the input price), as OpenAI's pricing page lists.
_DEFAULT_PRICES = {
    "demo": ["0", "0"],
    "gpt-4o-mini": ["0.15", "0.60", "0.075"],
    "gpt-4o": ["2.50", "10.00", "1.25"],
    "gpt-4.1-mini": ["0.40", "1.60", "0.10"],
    "gpt-4.1": ["2.00", "8.00", "0.50"],
}
_prices_json = env_str("CHAT_MODEL_PRICES")
CHAT_MODEL_PRICES = {
    name: tuple(Decimal(str(price)) for price in prices[:3])
    for name, prices in (json.loads(_prices_json) if _prices_json else _DEFAULT_PRICES).items()
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {
        # httpx logs full request lines; keep them out unless asked for.
        "httpx": {"level": "WARNING"},
        "httpx2": {"level": "WARNING"},
        "daphne": {"level": "WARNING"},
        # daphne's runserver prints its own access log line; don't log each twice.
        "django.channels.server": {"propagate": False},
    },
}
