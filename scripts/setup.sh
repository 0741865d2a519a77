#!/usr/bin/env bash
# Creates .venv and installs the pinned packages (runtime, or dev with --dev).
# Re-running is cheap: pip runs only when a requirements file changed.
set -euo pipefail
cd "$(dirname "$0")/.."
reqs=requirements.txt
[ "${1:-}" = "--dev" ] && reqs=requirements-dev.txt
stamp_for() {
  echo ".venv/.installed-$(cat requirements.txt "$1" | sha256sum | cut -c1-16)-$(basename "$1")"
}
if [ ! -x .venv/bin/python ]; then
  echo "Creating .venv (first run only)..."
  "${PYTHON:-python3}" -m venv .venv
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
fi
stamp="$(stamp_for "$reqs")"
# requirements-dev.txt includes requirements.txt, so a dev install satisfies a runtime one.
if [ ! -f "$stamp" ] && [ ! -f "$(stamp_for requirements-dev.txt)" ]; then
  echo "Installing $reqs into .venv (first run, or the requirements changed)..."
  .venv/bin/python -m pip install -q --disable-pip-version-check -r "$reqs"
  touch "$stamp"
fi
