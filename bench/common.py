"""Helpers shared by the benches (``bench.load``, ``bench.churn``).

Processes on loopback ports, a fresh PostgreSQL database, logged-in users, the loopback
upstream of ``bench.upstream`` in a process of its own, the ``worker.stats`` question to
every worker (``chat.generation.leases``), and the figures read from outside a process: resident
memory (``/proc``) and Redis pub/sub subscriptions. Nothing here reaches the network.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# --- processes ------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, process: subprocess.Popen, name: str, timeout: float = 30) -> None:
    """Wait until ``process`` accepts connections on 127.0.0.1:``port``.

    Raises RuntimeError when it exits first or does not listen within ``timeout`` s.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{name} did not listen on {port} in {timeout} s")


def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 10 s; returns once the process is gone."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def rss_kb(pid: int) -> int | None:
    """Resident memory of a process in KiB (``VmRSS`` of ``/proc/<pid>/status``), or
    None when the process is gone (Linux only)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


# --- database and users ---------------------------------------------------------------
def recreate_database(postgres: str, name: str) -> str:
    """Drop and create database ``name`` on the server ``postgres``
    (``postgres://user@host:port``, no database); returns its URL."""
    import psycopg

    with psycopg.connect(f"{postgres}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{postgres}/{name}"


def session_cookies(users) -> list[str]:
    """One logged-in session per user (``"sessionid=..."`` Cookie header values, in the
    order of ``users``), saved in the session store as ``django.contrib.auth.login``
    would, without a request. Needs Django set up on the bench's database."""
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
    from django.contrib.sessions.backends.db import SessionStore

    cookies = []
    for user in users:
        session = SessionStore()
        session[SESSION_KEY] = str(user.pk)
        session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
        session[HASH_SESSION_KEY] = user.get_session_auth_hash()
        session.create()
        cookies.append(f"sessionid={session.session_key}")
    return cookies


# --- the loopback upstream ------------------------------------------------------------
def start_upstream(
    env: dict[str, str], port: int, *, tokens_per_second: float, tokens: int, log
) -> subprocess.Popen:
    """Start ``bench.upstream`` (an OpenAI-compatible server answering ``tokens``
    timestamped tokens at ``tokens_per_second``) on 127.0.0.1:``port`` in a process of
    its own, output to the open file ``log``; returns once it listens."""
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.upstream", "--port", str(port),
         "--tokens-per-second", str(tokens_per_second), "--tokens", str(tokens)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        wait_port(port, process, "upstream")
    except BaseException:
        stop_process(process)
        raise
    return process


def upstream_stats(port: int) -> dict:
    """``GET /stats`` of ``bench.upstream``: ``{"open_streams": n, "requests": [...]}``
    (every request with its tag, times in ``time.monotonic()`` s, and whether it is
    still open)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=30) as response:
        return json.load(response)


# --- workers over the channel layer ---------------------------------------------------
async def query_workers(expected: int, timeout: float = 5.0, stacks: bool = True) -> list[dict]:
    """Ask every worker (channel-layer group ``chat.workers``, answered by
    ``chat.generation.leases``) what it still runs; returns the replies that came within
    ``timeout`` s, at most ``expected``. Each is ``chat.generation.leases.worker_stats()``.

    Needs Django set up with the workers' Redis channel layer (an in-memory layer
    reaches no other process). On the pub/sub layer the reply channel is released
    afterwards, so the bench's own subscription is not counted as the workers'.
    """
    from channels.layers import get_channel_layer
    from channels_redis.pubsub import RedisPubSubChannelLayer

    from chat.generation.frames import WORKERS_GROUP

    layer = get_channel_layer()
    replies = []
    try:
        reply_channel = await layer.new_channel()
        await layer.group_send(
            WORKERS_GROUP, {"type": "worker.stats", "reply_channel": reply_channel,
                            "stacks": stacks}
        )
        try:
            async with asyncio.timeout(timeout):
                while len(replies) < expected:
                    replies.append(await layer.receive(reply_channel))
        except TimeoutError:
            pass
    finally:
        if isinstance(layer, RedisPubSubChannelLayer):
            # Unsubscribes and closes this loop's connections (asyncio.run ends it).
            await layer.flush()
    return replies


# --- Redis ----------------------------------------------------------------------------
def cleanup_redis(url: str, prefix: str) -> None:
    """Delete the run's channel-layer keys (groups otherwise live a day)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def redis_pubsub(url: str, prefix: str) -> dict:
    """Pub/sub subscriptions held on the Redis server at ``url`` now:
    ``{"channels": n, "subscribers": n, "numpat": n, "names": [...]}`` where
    ``channels`` counts the channels starting with ``prefix`` that have a subscriber
    (``PUBSUB CHANNELS``; ``names`` lists them without the prefix), ``subscribers`` sums
    their subscriptions (``PUBSUB NUMSUB``) and ``numpat`` is the server-wide count of
    pattern subscriptions (``PUBSUB NUMPAT``, not per prefix: Redis does not tell whose
    they are). Pub/sub ignores the database number, hence the prefix."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        channels = client.pubsub_channels(f"{prefix}*")
        subscribers = sum(n for _, n in client.pubsub_numsub(*channels)) if channels else 0
        names = sorted(c.decode()[len(prefix):] for c in channels)
        return {"channels": len(channels), "subscribers": subscribers,
                "numpat": client.pubsub_numpat(), "names": names}
    finally:
        client.close()
