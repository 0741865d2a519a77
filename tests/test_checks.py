"""System checks refuse settings unsafe in production: ``manage.py check --deploy``
exits non-zero, naming what to fix (chat/checks.py, docs/scale.md)."""

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from django.core import checks
from django.test import override_settings

ROOT = Path(__file__).resolve().parent.parent
GOOD_KEY = secrets.token_urlsafe(50)
PRODUCTION = {
    "DEBUG": "0",
    "SECRET_KEY": GOOD_KEY,
    "ALLOWED_HOSTS": "chat.example.org",
    # `check` does not connect to either service.
    "DATABASE_URL": "postgres://chat@127.0.0.1:5432/chat",
    "REDIS_URL": "redis://127.0.0.1:6379/0",
}


def manage_check(*args, **env) -> subprocess.CompletedProcess:
    base = {
        k: v for k, v in os.environ.items()
        if k not in {"DEBUG", "SECRET_KEY", "DATABASE_URL", "REDIS_URL", "ALLOWED_HOSTS"}
    }
    return subprocess.run(
        [sys.executable, "manage.py", "check", *args],
        cwd=ROOT, env={**base, "DJANGO_SETTINGS_MODULE": "chatproject.settings", **env},
        capture_output=True, text=True, timeout=60,
    )


def test_deploy_check_passes_with_postgresql_redis_and_a_real_secret_key():
    result = manage_check("--deploy", **PRODUCTION)
    assert result.returncode == 0, result.stderr
    assert "chat.E" not in result.stdout + result.stderr


def test_deploy_check_refuses_the_in_memory_channel_layer_with_debug_off():
    result = manage_check("--deploy", **{**PRODUCTION, "REDIS_URL": ""})
    assert result.returncode != 0
    assert "chat.E001" in result.stderr and "REDIS_URL" in result.stderr
    assert "chat.E002" not in result.stderr


def test_deploy_check_refuses_sqlite_with_debug_off():
    result = manage_check("--deploy", **{**PRODUCTION, "DATABASE_URL": ""})
    assert result.returncode != 0
    assert "chat.E002" in result.stderr and "DATABASE_URL" in result.stderr
    assert "chat.E001" not in result.stderr


def test_deploy_check_refuses_a_missing_secret_key_with_debug_off():
    result = manage_check("--deploy", **{**PRODUCTION, "SECRET_KEY": ""})
    assert result.returncode != 0
    assert "chat.E003" in result.stderr


def test_deploy_check_refuses_debug_on():
    result = manage_check("--deploy", **{**PRODUCTION, "DEBUG": "1"})
    assert result.returncode != 0
    assert "chat.E004" in result.stderr


def test_plain_check_accepts_the_development_defaults():
    result = manage_check(DEBUG="1", SECRET_KEY="", DATABASE_URL="", REDIS_URL="")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "key",
    ["short-key", "a" * 60, "django-insecure-" + "x1y2z3" * 10],
    ids=["too short", "too few distinct characters", "django-insecure prefix"],
)
def test_a_weak_secret_key_is_refused_with_debug_off(key):
    with override_settings(DEBUG=False, SECRET_KEY=key):
        ids = {message.id for message in checks.run_checks(tags=["chat"])}
    assert "chat.E003" in ids


def test_a_strong_secret_key_is_accepted_with_debug_off():
    with override_settings(DEBUG=False, SECRET_KEY=GOOD_KEY):
        ids = {message.id for message in checks.run_checks(tags=["chat"])}
    assert "chat.E003" not in ids
