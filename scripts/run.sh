#!/usr/bin/env bash
# Runs the app on its embedded defaults: SQLite, in-memory channel layer, demo model.
# Once the server accepts connections it prints its URL and the next steps (create an
# account, make an admin, admin and API docs). Set OPENAI_API_KEY/OPENAI_BASE_URL for a
# real model; HOST and PORT change where it listens (default 127.0.0.1:8000).
set -euo pipefail
cd "$(dirname "$0")/.."
host="${HOST:-127.0.0.1}"
port="${PORT:-8000}"
# A wildcard address listens everywhere; people (and the readiness poll) use loopback.
case "$host" in
  0.0.0.0) near=127.0.0.1 ;;
  ::|"[::]") near=::1 ;;
  *) near="${host#[}"; near="${near%]}" ;;
esac
case "$near" in *:*) url="http://[$near]:$port" ;; *) url="http://$near:$port" ;; esac

port_open() { (exec 3<>"/dev/tcp/$near/$port") 2>/dev/null; }

if port_open; then
  echo "Port $port on $near is already in use (another server?). Stop it, or run: PORT=8001 bash scripts/run.sh" >&2
  exit 1
fi

bash scripts/setup.sh
.venv/bin/python manage.py migrate --noinput

if [ -z "${OPENAI_API_KEY:-}${OPENAI_BASE_URL:-}" ]; then
  model_note="Answers come from the built-in demo model (no OPENAI_API_KEY set)."
else
  model_note="Answers come from ${OPENAI_BASE_URL:-the OpenAI API}."
fi

# Polls the port (every 0.1 s, up to 60 s) while the server starts, then tells the user
# where to go. $$ is this script's process, which becomes the server at `exec`: if it
# exits (an error it has printed), the poll stops quietly.
announce() {
  for _ in $(seq 600); do
    if port_open; then
      cat <<MSG

  Chat is running at $url/
  $model_note

  Next steps:
    1. Open $url/ and create an account.
    2. Make an admin (in another terminal):  bash scripts/manage.sh createsuperuser
    3. Admin:     $url/admin/
    4. API docs:  $url/api/docs/
  Any other manage.py command: bash scripts/manage.sh <command>. Stop with Ctrl-C.

MSG
      return
    fi
    kill -0 $$ 2>/dev/null || return
    sleep 0.1
  done
}
announce &
# No autoreloader: its parent process kills the server 0.25 s after Ctrl-C, and Ctrl-C
# drains (answers streaming finish, or end interrupted with usage: docs/scale.md).
exec .venv/bin/python manage.py runserver --noreload "$host:$port"
