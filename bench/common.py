"""Pieces shared by the benches (``bench.load``, ``bench.churn``, ``bench.throughput``):
processes on loopback ports and what is read of them from outside (CPU time, time waiting
for a CPU, resident memory), PostgreSQL databases and logged-in users, the loopback
upstream of ``bench.upstream`` in a process of its own and its ``/stats``, the
``worker.stats`` question to every worker (``chat.generation.leases``), Redis pub/sub
counts, the websocket client that reads timestamped tokens, and the figures
(percentiles). Nothing here reaches the network.

Clocks: ``time.monotonic()`` is one clock for every process of the machine (Linux
``CLOCK_MONOTONIC``), so times taken in the orchestrator, the clients and the upstream
compare directly; token stamps written by the bench upstream are wall-clock
(``time.time()``) and are compared with the receiver's wall clock.

Also a small command line: the entry of :class:`Child` processes, and preparing a
database in a process of its own (Django settings are read once per process, and one
bench may use several databases)::

    python -m bench.common prepare --users 300 --prefix tp50-
    # migrates the database of DATABASE_URL (or SQLITE_PATH), creates the users and
    # prints a JSON list of "sessionid=..." cookies, one per user
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts" / "bench"


# --- processes ------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, process: subprocess.Popen, name: str, timeout: float = 30) -> None:
    """Wait until ``process`` accepts connections on ``port``.

    Raises RuntimeError when the process exits first or ``timeout`` (s) passes.
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


def stop_process(process: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time (s) a process has used so far (Linux /proc, fields 14 and
    15 of ``/proc/<pid>/stat``, in clock ticks). 0.0 once the process is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_wait_seconds(pid: int) -> float:
    """Time (s) the threads of a process have spent runnable but waiting for a CPU
    (second field of ``/proc/<pid>/task/<tid>/schedstat``, ns), summed over the threads
    alive now. 0.0 once the process is gone."""
    total = 0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return 0.0
    for task in tasks:
        try:
            total += int((task / "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e9


def service_pids() -> dict[str, list[int]]:
    """PIDs of Redis and PostgreSQL on this machine (to report the CPU they used)."""
    pids: dict[str, list[int]] = {"redis": [], "postgres": []}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            name = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if name.startswith("redis-server"):
            pids["redis"].append(int(entry.name))
        elif name.startswith("postgres"):
            pids["postgres"].append(int(entry.name))
    return pids


def cpu_snapshot(named: dict[str, list[int]]) -> dict[str, float]:
    """``{name: CPU seconds used so far by all its pids}``."""
    return {name: sum(cpu_seconds(pid) for pid in pids) for name, pids in named.items()}


def wait_snapshot(named: dict[str, list[int]]) -> dict[str, float]:
    """``{name: seconds its pids' threads have waited for a CPU so far}``."""
    return {name: sum(cpu_wait_seconds(pid) for pid in pids) for name, pids in named.items()}


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




# --- the loopback upstream ------------------------------------------------------------
def start_upstream(port: int, env: dict, log_path: Path, *, tokens_per_second: float,
                   tokens: int) -> subprocess.Popen:
    """Start ``bench.upstream`` (an OpenAI-compatible server answering ``tokens``
    timestamped tokens at ``tokens_per_second``) on 127.0.0.1:``port`` in a process of
    its own, output to ``log_path``; returns once it listens (RuntimeError, the process
    stopped, when it does not)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
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


def upstream_stats(port: int, tag_prefix: str = "") -> dict:
    """``GET /stats[/<tag_prefix>]`` of ``bench.upstream``: ``{"open_streams": n,
    "requests": [...]}`` for the requests whose tag starts with ``tag_prefix`` (every
    request with its tag, times in ``time.monotonic()`` s, and whether it is still open;
    see ``bench.upstream.BenchUpstream.stats``)."""
    path = f"/stats/{urllib.parse.quote(tag_prefix)}" if tag_prefix else "/stats"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
        return json.load(response)


# --- the app's environment -------------------------------------------------------------
MODEL = "bench-model"


def app_env(upstream_port: int, max_tokens: int, *, secret_key: str | None = None
            ) -> dict[str, str]:
    """Environment variables of an app process (daphne worker, ``manage.py``) that
    streams from the ``bench.upstream`` on 127.0.0.1:``upstream_port``: model
    :data:`MODEL`, at most ``max_tokens`` tokens per answer, no client retries, warnings
    only in the logs. With ``secret_key`` the production settings (``DEBUG=0``, that key,
    loopback hosts: what ``check --deploy`` wants), else ``DEBUG=1``. The caller adds the
    database and channel layer (and ``os.environ``, when the rest should be inherited)."""
    env = {
        "DJANGO_SETTINGS_MODULE": "chatproject.settings",
        "PYTHONUNBUFFERED": "1",
        "OPENAI_BASE_URL": f"http://127.0.0.1:{upstream_port}/v1",
        "OPENAI_API_KEY": "bench-key-not-secret",
        "OPENAI_MAX_RETRIES": "0",
        "CHAT_MODEL": MODEL,
        "CHAT_MODELS": MODEL,
        "CHAT_MAX_TOKENS": str(max_tokens),
        "LOG_LEVEL": "WARNING",
    }
    if secret_key is None:
        return env | {"DEBUG": "1"}
    return env | {"DEBUG": "0", "SECRET_KEY": secret_key,
                  "ALLOWED_HOSTS": "127.0.0.1,localhost"}


# --- daphne workers and child processes ----------------------------------------------
def start_daphne(port: int, env: dict, log_path: Path) -> subprocess.Popen:
    """A daphne worker serving ``chatproject.asgi:application`` on ``port`` (does not
    wait for it to listen: see :func:`wait_port`)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "chatproject.server", "-b", "127.0.0.1", "-p", str(port),
             "chatproject.asgi:application"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )


class Child:
    """A function run in a process of its own, started at once, that can wait for a
    common start time: ``python -m bench.common child``, fed ``(fn, args)`` pickled on
    its standard input (so it works from any caller, pytest included, with nothing
    inherited but the environment). ``fn`` must be importable (a module-level function
    of a module other than ``__main__``).

    ``fn(channel, *args)`` gets a :class:`Channel`: it sends ``"ready"`` when it has
    imported what it needs, receives the start time (``time.monotonic()`` seconds),
    sends its result, and may wait for the channel to close (:meth:`stop`) to exit.
    :attr:`pid` is known as soon as it starts; its standard error goes to ``log_path``.
    ``python``: the interpreter to run it (another virtualenv's: bench.chainlit_client).
    """

    def __init__(self, fn: Callable, *args, log_path: Path | None = None,
                 python: str | Path = sys.executable):
        if fn.__module__ == "__main__":
            raise ValueError(f"{fn.__name__} must come from an importable module")
        log_path = log_path or ARTIFACTS / "child.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                [str(python), "-m", "bench.common", "child"], cwd=ROOT,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
            )
        self.channel = Channel(self.process.stdout, self.process.stdin)
        self.channel.send((fn, args))

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, timeout: float = 60) -> None:
        """Raises RuntimeError when the child died or is not ready in ``timeout`` s."""
        message = self.channel.recv(timeout)
        if message != "ready":
            raise RuntimeError(f"child {self.pid} failed to start: {message}")

    def go(self, start_at: float) -> None:
        self.channel.send(start_at)

    def result(self, timeout: float):
        """The child's result; RuntimeError when it sends none within ``timeout`` s."""
        return self.channel.recv(timeout)

    def stop(self) -> None:
        """Close the channel (a child waiting for its end exits), then stop it."""
        for stream in (self.process.stdin, self.process.stdout):
            with contextlib.suppress(OSError):
                stream.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)
        stop_process(self.process, grace=5)


class Channel:
    """Pickled objects over a pair of pipes (a :class:`Child` and its parent)."""

    def __init__(self, reader, writer):
        self.reader = reader
        self.writer = writer

    def send(self, obj) -> None:
        pickle.dump(obj, self.writer)
        self.writer.flush()

    def recv(self, timeout: float | None = None):
        """The next object; RuntimeError when none starts within ``timeout`` s or the
        other side closed its end."""
        if timeout is not None:
            ready, _, _ = select.select([self.reader], [], [], max(0.0, timeout))
            if not ready:
                raise RuntimeError(f"nothing received in {timeout:.0f} s")
        try:
            return pickle.load(self.reader)
        except EOFError:
            raise RuntimeError("the other process closed the channel") from None


def _child() -> None:
    channel = Channel(sys.stdin.buffer, sys.stdout.buffer)
    # Anything printed goes to the log, not into the channel.
    sys.stdout = sys.stderr
    fn, args = channel.recv()
    fn(channel, *args)


# --- databases and users --------------------------------------------------------------
def recreate_database(postgres: str, name: str) -> str:
    """Drop and create database ``name`` on the server ``postgres``
    (``postgres://user@host:port``, no database); returns its URL."""
    import psycopg

    with psycopg.connect(f"{postgres}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{postgres}/{name}"


def drop_database(postgres: str, name: str) -> None:
    """Drop database ``name`` if it exists."""
    import psycopg

    with psycopg.connect(f"{postgres}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


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


def make_session_cookies(count: int, prefix: str = "bench") -> list[str]:
    """Create ``count`` users (``<prefix><i>``, no usable password) with one logged-in
    session each (:func:`session_cookies`); returns their ``"sessionid=..."`` cookies in
    the order of ``i``. Needs Django set up."""
    from django.contrib.auth.models import User
    from django.db import connections

    users = User.objects.bulk_create(
        [User(username=f"{prefix}{i}", password="!") for i in range(count)]
    )
    names = [u.username for u in users]
    cookies = session_cookies(User.objects.filter(username__in=names).order_by("id"))
    connections.close_all()
    return cookies


def prepare_database(env: dict, users: int, prefix: str) -> list[str]:
    """Migrate the database that ``env`` points at and create ``users`` users, in a
    process of its own; returns their session cookies."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.common", "prepare", "--users", str(users),
         "--prefix", prefix],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    if done.returncode:
        raise RuntimeError(f"preparing the database failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


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


# --- the websocket client -------------------------------------------------------------
async def sleep_until(at: float) -> None:
    """Sleep until ``time.monotonic()`` reaches ``at``."""
    delay = at - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


def parse_tokens(text: str) -> list[tuple[int, float]]:
    """``" 3@1732170000.1 4@1732170000.15"`` -> [(3, 1732170000.1), (4, ...)]."""
    out = []
    for piece in text.split():
        index, _, stamp = piece.partition("@")
        out.append((int(index), float(stamp)))
    return out


@dataclass
class SocketRecord:
    """What one socket saw. Times are ``time.monotonic()`` s; latencies are ms from the
    upstream's write (wall clock) to this socket's receive (wall clock)."""

    role: str  # owner | watcher
    message_id: str | None = None
    tokens: list[int] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    # Receive time of each token, parallel to latencies_ms.
    received_at: list[float] = field(default_factory=list)
    deltas: int = 0
    seq_gaps: int = 0
    seq_dups: int = 0
    states: int = 0
    end_status: str | None = None
    left_early: bool = False
    error: str | None = None
    sent_at: float | None = None  # the message frame
    first_delta_at: float | None = None
    stop_sent_at: float | None = None
    # `{"type": "error", "code": "overloaded"}` frames: the server refused a generation.
    refused: int = 0
    # ... by the frame's reason (chat.generation.admission: streams, starts, lag, busy).
    refused_reasons: dict[str, int] = field(default_factory=dict)


class Client:
    """One websocket of the bench, reading frames in a task of its own."""

    def __init__(self, role: str):
        self.record = SocketRecord(role)
        self.ws = None
        self.started = asyncio.Event()
        self.first_delta = asyncio.Event()
        self.ended = asyncio.Event()
        self.state = asyncio.Event()
        # Shown text from a checkpoint (state seq None): the server sends a real state
        # later, possibly after generation.end.
        self.unsynced = False
        self.synced = asyncio.Event()
        # The last ``overloaded`` error frame, until :meth:`rearm`.
        self.refusal: dict | None = None
        self._last_seq = 0
        self._reader: asyncio.Task | None = None

    async def open(self, port: int, conversation: str, cookie: str, *,
                   timeout: float = 60, close_timeout: float = 10) -> None:
        """Connect to the conversation's socket and wait for its ``state`` frame."""
        import websockets

        self.ws = await websockets.connect(
            f"ws://127.0.0.1:{port}/ws/conversations/{conversation}/",
            additional_headers={"Cookie": cookie, "Origin": f"http://127.0.0.1:{port}"},
            max_queue=None, ping_interval=None, open_timeout=timeout,
            close_timeout=close_timeout,
        )
        self._reader = asyncio.create_task(self._read())
        await asyncio.wait_for(self.state.wait(), timeout)

    async def _read(self) -> None:
        record = self.record
        try:
            async for raw in self.ws:
                now = time.time()
                frame = json.loads(raw)
                kind = frame["type"]
                if kind == "state":
                    record.states += 1
                    generation = frame.get("generation")
                    ours = generation and generation["message_id"] == record.message_id
                    self.unsynced = bool(ours and generation["seq"] is None)
                    if not self.unsynced:
                        self.synced.set()
                    if record.message_id and record.states > 1:
                        # A repair: the state's text replaces what the tab shows.
                        if generation and generation["message_id"] == record.message_id:
                            record.tokens = [k for k, _ in parse_tokens(generation["content"])]
                            self._last_seq = generation["seq"] or 0
                        else:
                            saved = next((m for m in frame["messages"]
                                          if m["id"] == record.message_id), None)
                            if saved is not None:
                                record.tokens = [k for k, _ in parse_tokens(saved["content"])]
                    self.state.set()
                elif kind == "generation.start":
                    record.message_id = frame["message"]["id"]
                    self._last_seq = 0
                    self.started.set()
                elif kind == "delta" and frame["message_id"] == record.message_id:
                    mono = time.monotonic()
                    record.deltas += 1
                    seq = frame["seq"]
                    if seq <= self._last_seq:
                        record.seq_dups += 1
                    elif seq != self._last_seq + 1:
                        record.seq_gaps += 1
                    self._last_seq = max(self._last_seq, seq)
                    for index, stamp in parse_tokens(frame["content"]):
                        record.tokens.append(index)
                        record.latencies_ms.append((now - stamp) * 1000)
                        record.received_at.append(mono)
                    if record.first_delta_at is None:
                        record.first_delta_at = mono
                    self.first_delta.set()
                elif kind == "generation.end" and frame["message_id"] == record.message_id:
                    record.end_status = frame["status"]
                    self.ended.set()
                elif kind == "error":
                    if frame.get("code") == "overloaded":
                        record.refused += 1
                        reason = str(frame.get("reason"))
                        record.refused_reasons[reason] = record.refused_reasons.get(reason, 0) + 1
                        self.refusal = frame
                    record.error = f"{frame.get('code')}: {frame.get('detail')}"
                    self.started.set()
                    self.ended.set()
        except Exception as exc:  # noqa: BLE001 - recorded, the bench goes on
            if not record.left_early:
                record.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.started.set()
            self.ended.set()
            self.state.set()
            self.synced.set()

    async def send(self, frame: dict) -> None:
        await self.ws.send(json.dumps(frame))

    def rearm(self) -> None:
        """Forget a refused message (``overloaded``) before sending it again on the same
        socket: the events and the error then describe the next one."""
        self.refusal = None
        self.record.error = None
        self.started.clear()
        self.ended.clear()

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


# --- figures --------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (nearest rank) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def fmt_ms(value: float | None) -> str:
    """``1234.5`` -> ``"1.2 s"``, ``42.1`` -> ``"42 ms"``, ``3.21`` -> ``"3.2 ms"``."""
    if value is None:
        return "n/a"
    if value >= 1000:
        return f"{value / 1000:.1f} s"
    return f"{value:.0f} ms" if value >= 10 else f"{value:.1f} ms"


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.common")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("child", help="run a Child's function (pickled on standard input)")
    prepare = sub.add_parser("prepare", help="migrate, create users, print their cookies")
    prepare.add_argument("--users", type=int, required=True)
    prepare.add_argument("--prefix", default="bench")
    args = parser.parse_args(argv)
    if args.command == "child":
        _child()
        return 0
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatproject.settings")
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", interactive=False, verbosity=0)
    print(json.dumps(make_session_cookies(args.users, args.prefix)))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
