#!/usr/bin/env bash
# Runs the whole test suite twice, as CI does: on the embedded defaults (SQLite,
# in-memory channel layer), then on PostgreSQL + Redis (issue: scale out).
# TEST_CONFIGS="defaults" or "postgres" runs one; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
bash scripts/services.sh
.venv/bin/ruff check .
configs="${TEST_CONFIGS:-defaults postgres}"
status=0
for config in $configs; do
  echo "=== test configuration: $config"
  case "$config" in
    defaults)
      env -u DATABASE_URL -u REDIS_URL .venv/bin/python -m pytest "$@" || status=1 ;;
    postgres)
      DATABASE_URL="${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}" \
      REDIS_URL="${TEST_REDIS_URL:-redis://127.0.0.1:6379/0}" \
        .venv/bin/python -m pytest "$@" || status=1 ;;
    *) echo "unknown configuration $config"; exit 2 ;;
  esac
done
exit $status
