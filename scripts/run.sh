#!/usr/bin/env bash
# Runs the app on its embedded defaults: SQLite, in-memory channel layer, demo model.
# http://127.0.0.1:8000/ (sign up there). Set OPENAI_API_KEY/OPENAI_BASE_URL for a real model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python manage.py migrate --noinput
exec .venv/bin/python manage.py runserver "${HOST:-127.0.0.1}:${PORT:-8000}"
