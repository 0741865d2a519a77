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
from csp.constants import NONE, SELF

from chat.tuning import parse as parse_tuning

BASE_DIR = Path(__file__).resolve().parent.parent


# Every environment variable these settings read (the env_* helpers add to it):
# chat.checks warns about a CHAT_* or OPENAI_* variable set but not in here (a typo).
ENV_VARIABLES: set[str] = set()


def env_str(name: str, default: str = "") -> str:
    """Return the environment variable ``name`` stripped, or ``default`` when unset/empty."""
    ENV_VARIABLES.add(name)
    value = os.environ.get(name, "").strip()
    return value or default


def env_bool(name: str, default: bool = False) -> bool:
    """Read a boolean: 1/true/yes/on are true, 0/false/no/off are false (case-insensitive).

    Raises ValueError for anything else, so a typo fails at start-up instead of silently
    meaning "false".
    """
    ENV_VARIABLES.add(name)
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
    ENV_VARIABLES.add(name)
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def env_float(name: str, default: float) -> float:
    """Read a float; raises ValueError naming the variable when it does not parse."""
    ENV_VARIABLES.add(name)
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
    ENV_VARIABLES.add(name)
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
    ENV_VARIABLES.add(name)
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

# --- HTTPS and browser security (README, "Configuration"; docs/scale.md, "Deployment") --
# HTTPS=1: the site is served over HTTPS only. Cookies are marked Secure, plain-HTTP
# requests are redirected to HTTPS, browsers are told by HSTS to use HTTPS only for
# SECURE_HSTS_SECONDS (s; 0 sends no HSTS header), this domain and its subdomains, and
# WebSocket origins are https:// ones (chat.auth.SameOriginValidator). Django's deployment
# checklist and `manage.py check --deploy` (security.W004/W008/W012/W016) ask for these.
HTTPS = env_bool("HTTPS", False)
SECURE_SSL_REDIRECT = HTTPS
SESSION_COOKIE_SECURE = HTTPS
CSRF_COOKIE_SECURE = HTTPS
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31536000 if HTTPS else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = HTTPS
SECURE_HSTS_PRELOAD = HTTPS
# BEHIND_PROXY=1: a TLS-terminating proxy (nginx) in front of daphne sets
# X-Forwarded-Proto, and a request is taken as HTTPS when it says "https". Set it only
# when the proxy always sets (or strips) that header: a client could send it otherwise.
BEHIND_PROXY = env_bool("BEHIND_PROXY", False)
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if BEHIND_PROXY else None
# Content-Security-Policy on every response (django-csp 4 format): only this site's
# scripts, styles, images (and data: ones), fetches and sockets, no plugins, no <base>,
# forms post here only, no framing (as X-Frame-Options: DENY). The API's HTML pages
# (DRF's browsable API, Swagger UI, Redoc) also get inline styles (chat.csp).
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [SELF],
        "script-src": [SELF],
        "style-src": [SELF],
        "img-src": [SELF, "data:"],
        "connect-src": [SELF],
        "object-src": [NONE],
        "base-uri": [NONE],
        "form-action": [SELF],
        "frame-ancestors": [NONE],
    },
}

INSTALLED_APPS = [
    # chat, then daphne, first: `manage.py runserver` is chat's (daphne's, serving
    # with chatproject.server.ChatServer), and it serves the ASGI application.
    "chat",
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.humanize",  # intcomma: thousands separators in the usage totals
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "channels",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "csp",
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
    "chat.csp.ContentSecurityPolicyMiddleware",
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
# without them ran in journal mode `delete` and failed under churn.
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
# functions) and closed it, a large share of a busy worker's CPU. A worker holds one
# connection per executor thread (a handful).
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
# (chat.channels_redis_adapter); "pubsub-plain": the stock layer, one locked round trip
# per message (collapses under a few hundred streams: docs/scale.md); "core": RedisChannelLayer.
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
            "BACKEND": ("chat.channels_redis_adapter.BatchingPubSubChannelLayer"
                        if CHANNEL_LAYER == "pubsub"
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
    # Enum components named for what they hold: the models a conversation may use
    # (CHAT_MODELS), and its empty choice, the default model (chat.api.schema_hooks).
    "ENUM_NAME_OVERRIDES": {"ChatModelEnum": "django.conf.settings.CHAT_MODELS"},
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "chat.api.schema_hooks.name_blank_enum",
    ],
}

# --- Chat / LLM -----------------------------------------------------------------------
# With no OPENAI_API_KEY and no OPENAI_BASE_URL the built-in demo model is used: an
# OpenAI-compatible streaming server started on a loopback port inside the process, and
# reached through the same `openai` SDK path as a real provider.
OPENAI_API_KEY = env_str("OPENAI_API_KEY")
OPENAI_BASE_URL = env_str("OPENAI_BASE_URL")
# The provider must connect and send its response headers within this (s), retries
# included; a server that hangs before answering fails the run after this long.
OPENAI_FIRST_BYTE_TIMEOUT_S = env_float("OPENAI_FIRST_BYTE_TIMEOUT_S", 20.0)
# A stream that sends nothing for this long (s) ends the run as failed.
CHAT_STREAM_IDLE_TIMEOUT_S = env_float("CHAT_STREAM_IDLE_TIMEOUT_S", 60.0)
OPENAI_MAX_RETRIES = env_int("OPENAI_MAX_RETRIES", 1)
# The API the provider is spoken to with, a key of chat.generation.providers.PROVIDERS:
# chat (POST /chat/completions, streamed) or responses (POST /v1/responses, streamed);
# unset: by profile (responses for the openai profile, chat for every other).
OPENAI_API = env_str("OPENAI_API").strip().lower()
# Responses API only: create responses with background: true (and store: true, so the
# provider keeps them for a while): a stop then cancels the response at the provider and
# records its billed usage, and a cut stream is resumed (docs/providers.md).
OPENAI_BACKGROUND = env_bool("OPENAI_BACKGROUND", False)
# What the provider is sent and where its reasoning and usage are read
# (chat.generation.providers.profiles, docs/providers.md): auto (from OPENAI_BASE_URL,
# else asked of the server once), openai, vllm, ollama, llamacpp, openrouter or deepseek.
OPENAI_PROVIDER = env_str("OPENAI_PROVIDER", "auto").strip().lower()
DEMO_MODEL_NAME = "demo"
CHAT_MODEL = env_str("CHAT_MODEL", DEMO_MODEL_NAME if not OPENAI_API_KEY and not OPENAI_BASE_URL
                     else "gpt-4o-mini")
# Models a conversation may pick; the default model is always allowed.
CHAT_MODELS = env_list("CHAT_MODELS", [CHAT_MODEL])
if CHAT_MODEL not in CHAT_MODELS:
    CHAT_MODELS.insert(0, CHAT_MODEL)
CHAT_SYSTEM_PROMPT = env_str("CHAT_SYSTEM_PROMPT", "You are a helpful assistant.")
# Tokens the model may read (prompt) plus write (max_tokens); history is trimmed from the
# oldest message to fit CHAT_CONTEXT_TOKENS - CHAT_MAX_TOKENS.
CHAT_CONTEXT_TOKENS = env_int("CHAT_CONTEXT_TOKENS", 16384)
CHAT_MAX_TOKENS = env_int("CHAT_MAX_TOKENS", 1024)
# Characters one message may have (a longer one gets an error frame / HTTP 400).
CHAT_MAX_MESSAGE_CHARS = env_int("CHAT_MAX_MESSAGE_CHARS", 32000)
# Client frames: tokens per second per socket (a user gets twice that over all their
# sockets on one worker); a message, regenerate, edit or sync costs 5, stop nothing.
# 0 turns the limit off (chat.ratelimit).
CHAT_FRAME_RATE = env_float("CHAT_FRAME_RATE", 10.0)
# Open WebSockets one user may have on one worker (0: no cap).
CHAT_MAX_SOCKETS_PER_USER = env_int("CHAT_MAX_SOCKETS_PER_USER", 20)
# Admission control (chat.generation.admission; docs/scale.md): new generations are
# refused with `overloaded` (HTTP 503) when this worker runs this many (0 = no limit),
# and when its event loop runs late or its starts queue up (CHAT_TUNING below).
CHAT_MAX_STREAMS_PER_WORKER = env_int("CHAT_MAX_STREAMS_PER_WORKER", 0)
# Graceful shutdown (chatproject.server; docs/scale.md, "Deploying without losing
# answers"): seconds a worker told to stop (SIGTERM/SIGINT) lets its running answers go
# on before it interrupts them (saved, with usage). Set the supervisor's stop timeout
# (systemd TimeoutStopSec, Kubernetes terminationGracePeriodSeconds) above it.
CHAT_SHUTDOWN_GRACE_S = env_float("CHAT_SHUTDOWN_GRACE_S", 60.0)
# Automatic stops (chat.generation.autostop; README, "Automatic stops"). Off unless set; a
# conversation may set its own (tighter) ceilings and turn the guard on or off.
CHAT_REPETITION_GUARD = env_bool("CHAT_REPETITION_GUARD", False)
# Per-answer ceilings: USD (prompt plus answer at the model's prices) and answer tokens;
# unset or 0: none.
CHAT_MAX_ANSWER_USD = env_decimal("CHAT_MAX_ANSWER_USD") or None
CHAT_MAX_ANSWER_TOKENS = env_int("CHAT_MAX_ANSWER_TOKENS", 0) or None
if CHAT_MAX_ANSWER_TOKENS is not None and CHAT_MAX_ANSWER_TOKENS < 0:
    raise ValueError(f"CHAT_MAX_ANSWER_TOKENS={CHAT_MAX_ANSWER_TOKENS} must not be negative")
# The streaming path's tuning constants (chat.tuning: read tick, coalescing, outbox and
# inbox limits, start and lag limits, checkpoints and leases, the repetition guard's
# rule, usage lookups): measured defaults, not settings; a benchmark or an unusual
# deployment overrides them with one JSON object, e.g. CHAT_TUNING='{"read_tick_ms": 60}'.
# An unknown name or a bad value stops the start-up with an error naming it.
CHAT_TUNING = parse_tuning(env_str("CHAT_TUNING"))
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

# --- Metrics (chat/metrics.py, docs/operations.md) -------------------------------------
# GET /metrics answers only requests with `Authorization: Bearer <CHAT_METRICS_TOKEN>`;
# unset, the endpoint answers 404 to everyone. (PROMETHEUS_MULTIPROC_DIR, for several
# workers, is read by prometheus_client itself at import.)
CHAT_METRICS_TOKEN = env_str("CHAT_METRICS_TOKEN", "")

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
