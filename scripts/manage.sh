#!/usr/bin/env bash
# Runs any manage.py command with the project's virtualenv, creating it first if needed,
# so nobody has to know about .venv:
#   bash scripts/manage.sh createsuperuser     # an admin for /admin/
#   bash scripts/manage.sh migrate
#   bash scripts/manage.sh check --deploy
# The current directory is kept, so relative paths in arguments mean what they say.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/scripts/setup.sh" >&2
exec "$root/.venv/bin/python" "$root/manage.py" "$@"
