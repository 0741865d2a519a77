"""System checks that refuse settings unsafe in production (``manage.py check --deploy``).

With ``DEBUG`` off the app is taken to be deployed, typically as several worker
processes behind a load balancer (docs/scale.md). Then:

- ``chat.E001``: the in-memory channel layer only reaches sockets of its own process, so
  deltas, stops and snapshots would not cross processes. Set ``REDIS_URL``.
- ``chat.E002``: SQLite serialises every writer of every process on one file lock (one
  checkpoint per second per streaming answer). Set ``DATABASE_URL`` to PostgreSQL.
- ``chat.E003``: ``SECRET_KEY`` unset (the development key), or too short/simple by
  Django's own rule (``security.W009``: at least 50 characters, 5 distinct, not prefixed
  ``django-insecure-``): sessions, hence logins, could be forged.
- ``chat.E005`` (always): the repetition guard's ``CHAT_REPETITION_*`` settings cannot
  work (chat.generation.autostop.RepetitionRule).
- ``chat.E006`` (always): ``OPENAI_PROVIDER`` names no provider profile
  (chat.generation.providers.profiles), or ``OPENAI_API`` no provider
  (chat.generation.providers.PROVIDERS).
- ``chat.E004`` (``--deploy`` only): ``DEBUG`` on; it leaks settings and source in error
  pages and keeps every SQL query in memory. Django only warns (``security.W018``).
- ``chat.W001`` (a warning): ``DEBUG`` off with the session and CSRF cookies not marked
  ``Secure``: they travel over plain HTTP, where anyone on the path can read a login.
  Set ``HTTPS=1`` (and ``BEHIND_PROXY=1`` behind a TLS-terminating proxy).

- ``chat.W002`` (a warning, always): a ``CHAT_*`` or ``OPENAI_*`` environment variable
  that nothing reads (a typo, or a former setting): it would be silently ignored.

All but the warnings are Errors, so ``manage.py check --deploy`` (run it before
starting the workers) exits non-zero.
"""

import difflib
import os

from django.conf import settings
from django.core import checks

from .generation.autostop import RepetitionRule
from .generation.providers import PROVIDERS
from .generation.providers.profiles import PROVIDER_CHOICES
from .tuning import FORMER_VARIABLES

SECRET_KEY_MIN_LENGTH = 50
SECRET_KEY_MIN_UNIQUE_CHARACTERS = 5


def _secret_key_is_weak(key: str) -> bool:
    return (
        not key
        or key == getattr(settings, "INSECURE_DEV_SECRET_KEY", None)
        or key.startswith("django-insecure")
        or len(key) < SECRET_KEY_MIN_LENGTH
        or len(set(key)) < SECRET_KEY_MIN_UNIQUE_CHARACTERS
    )


@checks.register("chat")
def check_production_services(app_configs=None, **kwargs):
    """chat.E001 (in-memory channel layer) and chat.E002 (SQLite) when DEBUG is off."""
    if settings.DEBUG:
        return []
    errors = []
    backend = settings.CHANNEL_LAYERS.get("default", {}).get("BACKEND", "")
    if backend.endswith("InMemoryChannelLayer") or not backend:
        errors.append(
            checks.Error(
                "The in-memory channel layer is used with DEBUG off.",
                hint="Several worker processes need a shared layer: set REDIS_URL "
                "(e.g. redis://127.0.0.1:6379/0).",
                id="chat.E001",
            )
        )
    if settings.DATABASES["default"]["ENGINE"].endswith("sqlite3"):
        errors.append(
            checks.Error(
                "SQLite is used with DEBUG off.",
                hint="Several worker processes would serialise on one file lock: set "
                "DATABASE_URL to PostgreSQL (e.g. postgres://chat@127.0.0.1:5432/chat).",
                id="chat.E002",
            )
        )
    return errors


@checks.register("chat")
def check_secret_key(app_configs=None, **kwargs):
    """chat.E003: missing or insecure SECRET_KEY when DEBUG is off."""
    if settings.DEBUG or not _secret_key_is_weak(getattr(settings, "SECRET_KEY", "")):
        return []
    return [
        checks.Error(
            "SECRET_KEY is unset or insecure with DEBUG off.",
            hint=f"Set SECRET_KEY to a random value of at least {SECRET_KEY_MIN_LENGTH} "
            "characters, e.g. python -c 'import secrets; print(secrets.token_urlsafe(50))'.",
            id="chat.E003",
        )
    ]


@checks.register("chat", deploy=True)
def check_debug_off(app_configs=None, **kwargs):
    """chat.E004 (deploy): DEBUG is on."""
    if not settings.DEBUG:
        return []
    return [
        checks.Error(
            "DEBUG is on in a deployment.",
            hint="Set DEBUG=0 (and SECRET_KEY, ALLOWED_HOSTS, DATABASE_URL, REDIS_URL).",
            id="chat.E004",
        )
    ]


@checks.register("chat")
def check_repetition_guard(app_configs=None, **kwargs):
    """chat.E005: the repetition guard's settings cannot work
    (chat.generation.autostop.RepetitionRule), e.g. a window too small to hold the
    repeats it counts. Checked whether or not the guard is on: a conversation may turn
    it on."""
    try:
        RepetitionRule.from_settings()
    except ValueError as exc:
        return [checks.Error(
            f"The repetition guard's settings cannot work: {exc}.",
            hint="See README, \"Automatic stops\", and chat/tuning.py (CHAT_TUNING).",
            id="chat.E005",
        )]
    return []


@checks.register("chat")
def check_provider(app_configs=None, **kwargs):
    """chat.E006: OPENAI_PROVIDER is not one of the provider profiles, or OPENAI_API
    not one of the providers."""
    errors = []
    value = getattr(settings, "OPENAI_PROVIDER", "auto")
    if value not in PROVIDER_CHOICES:
        errors.append(checks.Error(
            f"OPENAI_PROVIDER={value!r} is not a provider profile.",
            hint=f"One of {', '.join(PROVIDER_CHOICES)} (docs/providers.md).",
            id="chat.E006",
        ))
    value = getattr(settings, "OPENAI_API", "")
    if value and value not in PROVIDERS:
        errors.append(checks.Error(
            f"OPENAI_API={value!r} is not a provider API.",
            hint=f"One of {', '.join(PROVIDERS)} (docs/architecture.md).",
            id="chat.E006",
        ))
    return errors


@checks.register("chat")
def check_https_cookies(app_configs=None, **kwargs):
    """chat.W001: DEBUG off while the session or CSRF cookie may be sent over plain HTTP
    (``SESSION_COOKIE_SECURE``/``CSRF_COOKIE_SECURE`` off, as without ``HTTPS=1``).
    A warning, not an error: a test deployment on a private network may run plain HTTP."""
    if settings.DEBUG or (settings.SESSION_COOKIE_SECURE and settings.CSRF_COOKIE_SECURE):
        return []
    return [checks.Warning(
        "DEBUG is off but the session and CSRF cookies are sent over plain HTTP.",
        hint="Serve the site over HTTPS and set HTTPS=1 (secure cookies, redirect to "
        "HTTPS, HSTS); behind a TLS-terminating proxy also BEHIND_PROXY=1 "
        "(docs/scale.md, \"Deployment\").",
        id="chat.W001",
    )]


# Variables the openai SDK reads itself (openai-python's client and its logging): not
# typos, though these settings do not read them.
OPENAI_SDK_VARIABLES = frozenset({
    "OPENAI_ORG_ID", "OPENAI_PROJECT_ID", "OPENAI_LOG", "OPENAI_CUSTOM_HEADERS",
    "OPENAI_WEBHOOK_SECRET", "OPENAI_ADMIN_KEY", "OPENAI_API_VERSION", "OPENAI_API_TYPE",
})


@checks.register("chat")
def check_unknown_variables(app_configs=None, **kwargs):
    """chat.W002: a ``CHAT_*``/``OPENAI_*`` environment variable that neither the settings
    (``settings.ENV_VARIABLES``: every variable chatproject/settings.py reads) nor the
    openai SDK read, one warning each, with the setting it may have meant."""
    known = set(getattr(settings, "ENV_VARIABLES", ())) | OPENAI_SDK_VARIABLES
    warnings = []
    for name in sorted(os.environ):
        if not name.startswith(("CHAT_", "OPENAI_")) or name in known:
            continue
        if name in FORMER_VARIABLES:
            hint = (f"{name} is no longer a setting: it became the tuning constant "
                    f"{FORMER_VARIABLES[name]!r}, set with CHAT_TUNING='"
                    f'{{"{FORMER_VARIABLES[name]}": ...}}\' (chat/tuning.py).')
        else:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = (f"Did you mean {close[0]}? " if close else "") + (
                "The settings are listed in README, \"Configuration\".")
        warnings.append(checks.Warning(
            f"The environment variable {name} is set but nothing reads it.",
            hint=hint, id="chat.W002"))
    return warnings
