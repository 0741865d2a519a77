#!/usr/bin/env bash
# The virtualenv of the Chainlit configuration of `python -m bench.throughput`
# (`--configs defaults,chainlit`): Chainlit 2.12.0, the openai SDK its docs example
# imports, and python-socketio's asyncio client with aiohttp (the bench's clients).
# Kept outside the checkout and out of requirements.txt: nothing but that bench row
# needs it.
#
#   bash bench/chainlit_env.sh        # creates it if missing, prints its python
#
# CHAINLIT_VENV (default ~/.cache/chat-bench/chainlit-venv) says where; the bench
# finds the interpreter through CHAINLIT_PYTHON or that default. Idempotent: a venv
# that already has these versions is left as it is.
set -euo pipefail

VENV="${CHAINLIT_VENV:-$HOME/.cache/chat-bench/chainlit-venv}"
# The openai SDK of requirements.txt, so both sides speak to the upstream alike;
# python-socketio comes with Chainlit (its own pin), aiohttp for its asyncio client.
PINS=(chainlit==2.12.0 openai==3.51.0 aiohttp==3.14.5)
# Any Python 3.11 will do; Chainlit 2.12 needs 3.10 or later.
BASE_PYTHON="${CHAINLIT_BASE_PYTHON:-$(command -v python3.11 || command -v python3)}"

if [ ! -x "$VENV/bin/python" ]; then
    mkdir -p "$(dirname "$VENV")"
    "$BASE_PYTHON" -m venv "$VENV" >&2
fi
# A marker written after a complete install: a half-made venv (interrupted pip) is
# installed again.
MARKER="$VENV/.chat-bench-pins"
if [ ! -f "$MARKER" ] || [ "$(cat "$MARKER")" != "${PINS[*]}" ]; then
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PINS[@]}" >&2
    echo "${PINS[*]}" > "$MARKER"
fi
echo "$VENV/bin/python"
