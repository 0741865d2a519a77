#!/usr/bin/env bash
# Creates .venv and installs the pinned packages (runtime, or dev with --dev).
# Re-running is cheap: pip runs only when a requirements file changed.
set -euo pipefail
cd "$(dirname "$0")/.."
reqs=requirements.txt
[ "${1:-}" = "--dev" ] && reqs=requirements-dev.txt
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
fi
stamp=".venv/.installed-$(cat requirements.txt "$reqs" | sha256sum | cut -c1-16)-$(basename "$reqs")"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -r "$reqs"
  touch "$stamp"
fi
