"""A lean configuration: few CHAT_*/OPENAI_* settings, each documented in the README;
the streaming path's tuning constants overridden only through CHAT_TUNING, refused at
start-up when it names an unknown constant; a misspelt variable is warned about."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings
from django.core import checks

from chat import tuning
from chatproject import settings as settings_module

ROOT = Path(__file__).resolve().parent.parent
PREFIXES = ("CHAT_", "OPENAI_")


def start_django(**env) -> subprocess.CompletedProcess:
    """``manage.py check`` in a fresh process with ``env`` added: loads the settings
    and runs the system checks, as a worker's start-up loads the settings."""
    return subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "chatproject.settings", **env},
        timeout=120)


def test_an_unknown_tuning_name_stops_the_start_up_with_an_error_naming_it():
    started = start_django(CHAT_TUNING='{"read_tik_ms": 60}')
    assert started.returncode != 0
    assert "CHAT_TUNING: unknown name(s) read_tik_ms" in started.stderr
    assert "read_tick_ms" in started.stderr  # the known names are listed


@pytest.mark.parametrize("text, error", [
    ('{"lease_s": -1}', "lease_s=-1 must be a non-negative number"),
    ('{"outbox_limit": "64"}', "outbox_limit='64' must be a non-negative integer"),
    ('{"checkpoint_ms": 0.5}', "checkpoint_ms=0.5 must be a non-negative integer"),
    ('[60]', "CHAT_TUNING must be a JSON object"),
    ('{"read_tick_ms": 60', "CHAT_TUNING is not valid JSON"),
])
def test_a_bad_tuning_value_is_refused_with_the_name_and_the_rule(text, error):
    with pytest.raises(ValueError, match=re.escape(error)):
        tuning.parse(text)


def test_a_tuning_override_changes_only_the_constants_it_names():
    tuned = tuning.parse('{"read_tick_ms": 60, "sweep_s": 0.5}')
    assert tuned.read_tick_ms == 60 and tuned.sweep_s == 0.5
    assert tuned.checkpoint_ms == tuning.Tuning().checkpoint_ms == 1000
    assert tuning.parse("") == tuning.Tuning()
    with pytest.raises(ValueError, match="unknown name"):
        tuned.replace(read_tick=1)


def test_a_worker_started_with_chat_tuning_runs_with_those_constants():
    shown = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c",
         "from django.conf import settings; print(settings.CHAT_TUNING.read_tick_ms)"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "CHAT_TUNING": '{"read_tick_ms": 60}'})
    assert shown.stdout.strip().splitlines()[-1] == "60", shown.stderr


def unknown_variable_warnings(monkeypatch, **env) -> list[checks.CheckMessage]:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return [m for m in checks.run_checks() if m.id == "chat.W002"]


def test_a_misspelt_variable_is_warned_about_with_the_setting_it_may_mean(monkeypatch):
    warnings = unknown_variable_warnings(monkeypatch, CHAT_MAX_TOKEN="100")
    assert [w.msg for w in warnings] == [
        "The environment variable CHAT_MAX_TOKEN is set but nothing reads it."]
    assert "Did you mean CHAT_MAX_TOKENS?" in warnings[0].hint


def test_a_former_setting_is_warned_about_with_the_tuning_constant_it_became(monkeypatch):
    warnings = unknown_variable_warnings(monkeypatch, CHAT_UPSTREAM_READ_TICK_MS="60")
    assert len(warnings) == 1
    assert "'read_tick_ms'" in warnings[0].hint and "CHAT_TUNING" in warnings[0].hint


def test_settings_and_the_sdks_own_variables_are_not_warned_about(monkeypatch):
    assert unknown_variable_warnings(monkeypatch, CHAT_MODEL="x", OPENAI_ORG_ID="org-1",
                                     CHAT_TUNING="{}") == []


def test_the_misspelt_variable_warning_reaches_manage_py_check():
    started = start_django(OPENAI_BASE_UR="http://127.0.0.1:1/v1")
    assert started.returncode == 0  # a warning, not an error
    assert "chat.W002" in started.stderr and "OPENAI_BASE_UR" in started.stderr


def settings_variables() -> list[str]:
    return [name for name in dir(settings_module) if name.startswith(PREFIXES)]


def test_there_are_at_most_24_chat_and_openai_settings():
    assert len(settings_variables()) <= 24, settings_variables()


def test_every_chat_and_openai_variable_is_documented_in_the_readme_configuration():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`((?:CHAT|OPENAI)_[A-Z_]+)`", table))
    read = {name for name in settings.ENV_VARIABLES if name.startswith(PREFIXES)}
    assert read - documented == set()
