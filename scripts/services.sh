#!/usr/bin/env bash
# Makes sure what the tests need is on the machine: Debian's chromium (for Playwright),
# Debian's prometheus (tests/test_metrics.py),
# and PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379 running.
set -uo pipefail
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi; }

if ! command -v chromium >/dev/null 2>&1; then
  echo "installing Debian chromium for the browser tests"
  as_root apt-get update -qq && DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq chromium >/dev/null
fi

# Debian's prometheus (the server and promtool) for tests/test_metrics.py: the test runs
# its own server on a free port with a temporary config and storage. The package's own
# service is not wanted: without an init system it does not start, and where it did
# it listens on 9090, which the tests do not use.
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  echo "installing Debian prometheus for the metrics tests"
  as_root apt-get update -qq && DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq \
    --no-install-recommends prometheus >/dev/null
fi

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if ! port_open 5432; then
  echo "starting PostgreSQL"
  if command -v pg_ctlcluster >/dev/null 2>&1; then
    as_root pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
  fi
fi
if ! port_open 6379; then
  echo "starting Redis"
  if command -v redis-server >/dev/null 2>&1; then
    as_root mkdir -p /var/lib/redis /var/log/redis
    as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
      --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
  fi
fi
for i in $(seq 1 30); do port_open 5432 && port_open 6379 && break; sleep 1; done
port_open 5432 || echo "warning: PostgreSQL is not reachable on 127.0.0.1:5432"
port_open 6379 || echo "warning: Redis is not reachable on 127.0.0.1:6379"
exit 0
