#!/usr/bin/env bash
# Runs the test suite as CI does, in three configurations: the embedded defaults
# (SQLite, in-memory channel layer), PostgreSQL + Redis, and
# realmodel: the tests marked realmodel against llama.cpp's llama-server serving a real
# model (the first run on a machine builds it into a cache outside the checkout, which
# takes a while: README.md, "Tests", says how long; scripts/realmodel.sh).
# TEST_CONFIGS="defaults", "postgres" or "realmodel" runs some; extra arguments go to
# pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
bash scripts/services.sh
.venv/bin/ruff check .
configs="${TEST_CONFIGS:-defaults postgres realmodel}"
status=0
for config in $configs; do
  echo "=== test configuration: $config"
  case "$config" in
    # REALMODEL unset: the realmodel tests run once, in their own configuration.
    defaults)
      env -u DATABASE_URL -u REDIS_URL -u REALMODEL .venv/bin/python -m pytest "$@" || status=1 ;;
    postgres)
      DATABASE_URL="${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}" \
      REDIS_URL="${TEST_REDIS_URL:-redis://127.0.0.1:6379/0}" \
        env -u REALMODEL .venv/bin/python -m pytest "$@" || status=1 ;;
    realmodel)
      # Built (or found in the cache) here, so the build's output shows in the log.
      if PYTHON=.venv/bin/python bash scripts/realmodel.sh >/dev/null; then
        env -u DATABASE_URL -u REDIS_URL REALMODEL=1 \
          .venv/bin/python -m pytest -m realmodel "$@" || status=1
      else
        echo "scripts/realmodel.sh failed: llama-server or the model is missing"; status=1
      fi ;;
    *) echo "unknown configuration $config"; exit 2 ;;
  esac
done
exit $status
