"""Every SQLite database gets the same tuning, however it is configured: WAL journal,
IMMEDIATE transactions and a busy timeout, for ``DATABASE_URL=sqlite:///path`` as for
the default ``SQLITE_PATH`` database.

Each case starts a fresh Python process, since the settings are read once at start-up.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.live import ROOT

PROBE = """
import json, django
django.setup()
from django.db import connection
with connection.cursor() as cursor:
    cursor.execute("PRAGMA journal_mode")
    journal_mode = cursor.fetchone()[0]
    cursor.execute("PRAGMA busy_timeout")
    busy_timeout_ms = cursor.fetchone()[0]
print(json.dumps({
    "journal_mode": journal_mode,
    "busy_timeout_ms": busy_timeout_ms,
    "transaction_mode": connection.transaction_mode,
}))
"""


def probe(**env) -> dict:
    """What a process with this environment gets from its SQLite connection."""
    clean = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    result = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**clean, "DJANGO_SETTINGS_MODULE": "chatproject.settings", **env},
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("configured_by", ["DATABASE_URL", "SQLITE_PATH"])
def test_sqlite_runs_in_wal_with_immediate_transactions_and_a_busy_timeout(
    tmp_path, configured_by
):
    path = tmp_path / "chat.sqlite3"
    if configured_by == "DATABASE_URL":
        got = probe(DATABASE_URL=f"sqlite:///{path}")
    else:
        got = probe(SQLITE_PATH=str(path))
    assert got == {"journal_mode": "wal", "busy_timeout_ms": 20000,
                   "transaction_mode": "IMMEDIATE"}


def test_options_in_the_database_url_win_over_the_defaults(tmp_path):
    got = probe(DATABASE_URL=f"sqlite:///{tmp_path / 'chat.sqlite3'}?timeout=3")
    assert got["busy_timeout_ms"] == 3000 and got["journal_mode"] == "wal"
