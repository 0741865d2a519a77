"""Churn benchmark: hundreds of short-lived sockets, each leaving its own way, then a
count of what they left behind.

    python -m bench.churn                          # both configurations, one after the other
    python -m bench.churn --config postgres        # one configuration
    python -m bench.churn --config defaults --sockets 10 --duration 5 --tokens 40

Each configuration runs the app as it is configured, against a loopback upstream
(``bench.upstream`` in its own process):

- ``defaults``: the embedded defaults: 1 daphne worker, SQLite (a fresh database file in
  a temporary directory, migrated; ``DEBUG`` on, as shipped) and the in-memory channel
  layer;
- ``postgres``: ``--pg-workers`` (2) daphne workers (``DEBUG=0``, after
  ``manage.py check --deploy``) on a PostgreSQL database of its own (``--database``,
  dropped, created and migrated) and Redis (``--redis``, ``RedisPubSubChannelLayer``)
  with a channel prefix of its own (``churn<random>``).

``--sockets`` sockets are opened over ``--duration`` seconds, on a random worker, each
as one of ``--users`` users (logged-in sessions; no concurrency limit). Each waits for
its ``state`` frame, sends one message in a new conversation, then, at random (seeded
by ``--seed``): **stops** (a ``stop`` frame, then waits for ``generation.end``),
**disconnects** abruptly (the TCP connection is dropped, no close frame), or **waits**
for the end of the answer; stops and disconnects happen at once (a third of them) or
after a random time within the answer. Every client step has a timeout; the whole
configuration is bounded by ``--max-seconds``.

What it prints per configuration, ``--settle`` (5) seconds after the last socket
finished, and the target each must meet:

- client errors (connect failures, timeouts, ``error`` frames, a socket closed by the
  server before its ``generation.end``): 0;
- abnormal close codes the clients received (1011 and anything but 1000/1001): 0;
- assistant rows still ``streaming``: 0;
- upstream connections still open: 0;
- usage records vs assistant rows: equal;
- Redis pub/sub channels of the prefix, and their subscriptions, before vs after: equal
  (``postgres``; ``PUBSUB NUMPAT`` is shown too, server-wide);
- generations still registered in the workers (``worker.stats``): 0 (``postgres``);
- worker RSS before/after (``/proc/<pid>/status`` VmRSS), runs by status, error lines in
  the worker logs: shown, no target.

Exit status: 0 every target met, 1 a target missed, 2 the bench could not run. ``--json
FILE`` writes the figures. Loopback only; every process it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.common import (
    ROOT,
    app_env,
    cleanup_redis,
    free_port,
    query_workers,
    recreate_database,
    redis_pubsub,
    rss_kb,
    session_cookies,
    start_upstream,
    stop_process,
    upstream_stats,
)

ARTIFACTS = ROOT / "artifacts" / "churn"
CONFIGS = ("defaults", "postgres")
NORMAL_CLOSES = {1000, 1001}


# --- the plan -------------------------------------------------------------------------
@dataclass
class Plan:
    """One socket: when it opens (s after the start), where, as whom, and how it ends."""

    index: int
    start_s: float
    port: int
    cookie: str
    action: str  # stop | disconnect | wait
    act_after_s: float  # after the message was sent; 0 = at once


def make_plans(args, cookies: list[str], ports: list[int]) -> list[Plan]:
    """``args.sockets`` plans spread evenly over ``args.duration`` s, seeded."""
    rng = random.Random(args.seed)
    answer_s = args.tokens / args.tokens_per_second
    slot = args.duration / args.sockets
    plans = []
    for index in range(args.sockets):
        action = rng.choice(["stop", "disconnect", "wait"])
        act_after = 0.0 if rng.random() < 1 / 3 else rng.uniform(0, answer_s)
        plans.append(Plan(
            index=index, start_s=index * slot + rng.uniform(0, slot), port=rng.choice(ports),
            cookie=rng.choice(cookies), action=action,
            act_after_s=0.0 if action == "wait" else act_after,
        ))
    return plans


# --- clients --------------------------------------------------------------------------
@dataclass
class SocketRecord:
    """What one client saw. ``close_code`` is None for sockets the client dropped."""

    index: int
    action: str
    port: int
    message_id: str | None = None
    end_status: str | None = None
    close_code: int | None = None
    error_frames: list[str] = field(default_factory=list)
    error: str | None = None


async def run_socket(plan: Plan, t0: float, end_timeout: float) -> SocketRecord:
    """Open, send one message, then stop / drop / wait as planned (bounded)."""
    import websockets

    record = SocketRecord(plan.index, plan.action, plan.port)
    await asyncio.sleep(max(0.0, t0 + plan.start_s - time.monotonic()))
    url = f"ws://127.0.0.1:{plan.port}/ws/conversations/{uuid.uuid4()}/"
    try:
        ws = await websockets.connect(
            url, additional_headers={"Cookie": plan.cookie,
                                     "Origin": f"http://127.0.0.1:{plan.port}"},
            open_timeout=30, ping_interval=None, max_queue=None, close_timeout=5,
        )
    except Exception as exc:  # noqa: BLE001 - recorded, the bench goes on
        record.error = f"connect: {type(exc).__name__}: {exc}"
        return record
    got_state, ended = asyncio.Event(), asyncio.Event()
    dropped = False

    async def read():
        try:
            async for raw in ws:
                frame = json.loads(raw)
                kind = frame.get("type")
                if kind == "state":
                    got_state.set()
                elif kind == "generation.start" and record.message_id is None:
                    record.message_id = frame["message"]["id"]
                elif kind == "generation.end" and frame.get("message_id") == record.message_id:
                    record.end_status = frame.get("status")
                    ended.set()
                elif kind == "error":
                    record.error_frames.append(f"{frame.get('code')}: {frame.get('detail')}")
        except Exception:  # noqa: BLE001 - the close code tells what happened
            pass
        finally:
            got_state.set()
            ended.set()

    reader = asyncio.create_task(read())
    try:
        async with asyncio.timeout(30):
            await got_state.wait()
        if ws.close_code is None:
            await ws.send(json.dumps({"type": "message", "content": f"churn-{plan.index}"}))
            if plan.act_after_s:
                await asyncio.sleep(plan.act_after_s)
            if plan.action == "disconnect":
                # No close frame, no FIN handshake wait: as a tab whose network vanished.
                ws.transport.abort()
                dropped = True
            else:
                if plan.action == "stop" and ws.close_code is None:
                    await ws.send(json.dumps({"type": "stop"}))
                async with asyncio.timeout(end_timeout):
                    await ended.wait()
                if record.end_status is None and ws.close_code in NORMAL_CLOSES | {None}:
                    record.error = "closed before generation.end"
    except TimeoutError:
        record.error = ("no state frame in 30 s" if not got_state.is_set()
                        else f"no generation.end in {end_timeout:.0f} s")
    except Exception as exc:  # noqa: BLE001
        record.error = f"{type(exc).__name__}: {exc}"
    finally:
        if not dropped:
            try:
                await ws.close()
            except Exception:  # noqa: BLE001
                pass
            record.close_code = ws.close_code
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    return record


async def run_clients(plans: list[Plan], end_timeout: float, budget_s: float) -> list[dict]:
    """Run every plan; sockets still running after ``budget_s`` s are cancelled and
    recorded as errors."""
    t0 = time.monotonic()
    tasks = [asyncio.create_task(run_socket(p, t0, end_timeout)) for p in plans]
    await asyncio.wait(tasks, timeout=budget_s)
    records = []
    for plan, task in zip(plans, tasks, strict=True):
        if task.done() and not task.cancelled() and task.exception() is None:
            records.append(asdict(task.result()))
            continue
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        record = SocketRecord(plan.index, plan.action, plan.port)
        record.error = f"bench time limit ({budget_s:.0f} s)" if not task.done() else (
            f"{type(task.exception()).__name__}: {task.exception()}")
        records.append(asdict(record))
    return records


async def warm_up(ports: list[int], cookie: str, generate: bool) -> None:
    """One socket per worker, opened and closed: starts each worker's lazily started
    tasks (sweeper, stats listener). With ``generate``, the socket also starts an
    answer and stops it after its first delta, so the modules and data a run loads on
    first use (openai SDK, tokenizer) are in the "before" memory figure."""
    import websockets

    for port in ports:
        async with websockets.connect(
            f"ws://127.0.0.1:{port}/ws/conversations/{uuid.uuid4()}/",
            additional_headers={"Cookie": cookie, "Origin": f"http://127.0.0.1:{port}"},
            open_timeout=30,
        ) as ws:
            async with asyncio.timeout(60):
                while json.loads(await ws.recv())["type"] != "state":
                    pass
                if not generate:
                    continue
                await ws.send(json.dumps({"type": "message", "content": "churn-warm-up"}))
                while json.loads(await ws.recv())["type"] != "delta":
                    pass
                await ws.send(json.dumps({"type": "stop"}))
                while json.loads(await ws.recv())["type"] != "generation.end":
                    pass


def all_workers_answer(expected: int, tries: int = 10) -> list[dict]:
    """``worker.stats`` replies, asked again until every worker answered (bounded)."""
    replies: list[dict] = []
    for _ in range(tries):
        replies = asyncio.run(query_workers(expected, timeout=2, stacks=False))
        if len(replies) >= expected:
            break
    return replies


# --- figures --------------------------------------------------------------------------
def log_errors(path: Path) -> dict:
    """Tracebacks and ERROR lines in a worker's log."""
    text = path.read_text(errors="replace") if path.exists() else ""
    return {"tracebacks": text.count("Traceback (most recent call last)"),
            "error_lines": sum(1 for line in text.splitlines() if " ERROR " in line)}


def targets(s: dict) -> list[str]:
    """The targets ``s`` misses, as sentences (empty: all met)."""
    missed = []
    if s["client_errors"]:
        missed.append(f"{s['client_errors']} client errors")
    if s["abnormal_closes"]:
        missed.append(f"{s['abnormal_closes']} abnormal closes {s['close_codes']}")
    if s["streaming_after_settle"]:
        missed.append(f"{s['streaming_after_settle']} rows still streaming")
    if s["upstream_open"]:
        missed.append(f"{s['upstream_open']} upstream connections open")
    if s["usage_records"] != s["assistant_rows"]:
        missed.append(f"{s['usage_records']} usage records vs {s['assistant_rows']} "
                      "assistant rows")
    redis = s.get("redis")
    if redis and (redis["after"]["channels"] != redis["before"]["channels"]
                  or redis["after"]["subscribers"] != redis["before"]["subscribers"]):
        missed.append(f"Redis channels {redis['before']['channels']} -> "
                      f"{redis['after']['channels']}")
    if s.get("generations_left"):
        missed.append(f"{s['generations_left']} generations left in workers")
    if s["workers_died"]:
        missed.append(f"{s['workers_died']} workers died")
    return missed


def summarize(args, config, workers, records, db, upstream, rss, redis, stats, logs,
              elapsed_s, load) -> dict:
    """Figures of one configuration (see the module docstring)."""
    actions: dict[str, int] = {}
    codes: dict[str, int] = {}
    errors = []
    waited: dict[str, int] = {}
    for r in records:
        actions[r["action"]] = actions.get(r["action"], 0) + 1
        if r["close_code"] is not None and r["close_code"] not in NORMAL_CLOSES:
            codes[str(r["close_code"])] = codes.get(str(r["close_code"]), 0) + 1
        problems = ([r["error"]] if r["error"] else []) + r["error_frames"]
        if problems:
            errors.append(f"#{r['index']} {r['action']}: {'; '.join(problems)}")
        if r["action"] == "wait":
            key = r["end_status"] or "none"
            waited[key] = waited.get(key, 0) + 1
    summary = {
        "config": config,
        "workers": workers,
        "sockets": len(records),
        "actions": actions,
        "duration_s": args.duration,
        "tokens": args.tokens,
        "tokens_per_second": args.tokens_per_second,
        "users": args.users,
        "seed": args.seed,
        "settle_s": args.settle,
        "elapsed_s": round(elapsed_s, 1),
        "load_average": [round(x, 2) for x in load],
        "client_errors": len(errors),
        "error_samples": errors[:8],
        "close_codes": codes,
        "closes_1011": codes.get("1011", 0),
        "abnormal_closes": sum(codes.values()),
        "streaming_after_settle": db["streaming"],
        "upstream_open": upstream["open_streams"],
        "upstream_requests": len(upstream["requests"]),
        "usage_records": db["usage_records"],
        "assistant_rows": db["assistant_rows"],
        "statuses": db["statuses"],
        "waiters_end_status": waited,
        "rss_kb": rss,
        "redis": redis,
        "generations_left": (sum(w["generations"] + w["generation_tasks"] for w in stats)
                             if stats is not None else None),
        "workers_answering": len(stats) if stats is not None else None,
        "worker_logs": logs,
        "workers_died": sum(1 for w in logs.values() if w.get("exit_code") is not None),
    }
    if redis is not None:
        # What the channels left behind are: socket channels (``specific.``), group
        # channels of conversations (``__group__chat.``), of runs (``__group__chatctl.``).
        new = set(redis["after"]["names"]) - set(redis["before"]["names"])
        kinds: dict[str, int] = {}
        for name in new:
            kind = name.split(".", 1)[0] + "." if "." in name else name
            kinds[kind] = kinds.get(kind, 0) + 1
        redis["new_by_kind"] = kinds
    summary["targets_missed"] = targets(summary)
    return summary


def mib(kb: int | None) -> str:
    return "gone" if kb is None else f"{kb / 1024:.1f}"


def print_report(s: dict) -> None:
    """The human-readable report of one configuration: a heading line, then one
    ``label : value`` line per figure, the last one ``targets`` or ``TARGETS MISSED``."""

    def row(label: str, value: str) -> None:
        print(f"{label:<34}: {value}")

    setup = ("SQLite + in-memory layer" if s["config"] == "defaults"
             else "PostgreSQL + Redis pub/sub layer")
    load = " ".join(f"{x:g}" for x in s["load_average"])
    print(f"\n=== bench.churn: {s['config']} ({s['workers']} daphne worker"
          f"{'s' if s['workers'] != 1 else ''}, {setup}), {s['sockets']} sockets over "
          f"{s['duration_s']:g} s, answers {s['tokens']} tokens at {s['tokens_per_second']:g}"
          f" tokens/s, seed {s['seed']} ({s['elapsed_s']} s; load average {load})")
    row("sockets", f"{s['sockets']} ("
        + ", ".join(f"{k} {v}" for k, v in sorted(s["actions"].items())) + ")")
    row("client errors", str(s["client_errors"]))
    for sample in s["error_samples"]:
        print(f"    {sample[:200]}")
    row("1011 closes", str(s["closes_1011"]))
    codes = ", ".join(f"{k}: {v}" for k, v in sorted(s["close_codes"].items())) or "none"
    row("abnormal closes", f"{s['abnormal_closes']} ({codes})")
    row(f"rows still streaming after {s['settle_s']:g} s", str(s["streaming_after_settle"]))
    row("upstream connections open",
        f"{s['upstream_open']} (of {s['upstream_requests']} requests)")
    row("usage records vs assistant rows", f"{s['usage_records']} vs {s['assistant_rows']}")
    row("worker RSS before -> after", ", ".join(
        f"{name} {mib(v['before'])} -> {mib(v['after'])} MiB" for name, v in s["rss_kb"].items()
    ))
    redis = s["redis"]
    if redis is None:
        row("Redis pub/sub before -> after", "n/a (in-memory layer)")
    else:
        b, a = redis["before"], redis["after"]
        row("Redis pub/sub before -> after",
            f"channels {b['channels']} -> {a['channels']}, subscriptions {b['subscribers']} "
            f"-> {a['subscribers']} (prefix {redis['prefix']}); NUMPAT (server-wide) "
            f"{b['numpat']} -> {a['numpat']}")
        if redis.get("new_by_kind"):
            print("    channels left: " + ", ".join(
                f"{k}* {v}" for k, v in sorted(redis["new_by_kind"].items())))
    if s["generations_left"] is None:
        row("generations left in workers", "n/a (in-memory layer: not reachable)")
    else:
        row("generations left in workers", f"{s['generations_left']} "
            f"({s['workers_answering']} of {s['workers']} workers answered)")
    row("runs by status",
        ", ".join(f"{k} {v}" for k, v in sorted(s["statuses"].items())) or "none")
    row("ends seen by sockets that waited",
        ", ".join(f"{k} {v}" for k, v in sorted(s["waiters_end_status"].items())) or "none")
    row("worker logs", ", ".join(
        f"{name} {v['tracebacks']} tracebacks / {v['error_lines']} ERROR lines"
        + (f" (exited {v['exit_code']})" if v.get("exit_code") is not None else "")
        for name, v in s["worker_logs"].items()
    ))
    if s["targets_missed"]:
        row("TARGETS MISSED", "; ".join(s["targets_missed"]))
    else:
        row("targets", "all met")


# --- one configuration ----------------------------------------------------------------
def run_config(args, config: str) -> dict:
    """Start everything for ``config``, run the churn, measure, stop everything."""
    started = time.monotonic()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.TemporaryDirectory(prefix="churn-")
    upstream_port = free_port()
    prefix = f"churn{uuid.uuid4().hex[:8]}"
    max_tokens = max(args.tokens + 10, 64)
    if config == "defaults":
        workers = 1
        env = app_env(upstream_port, max_tokens) | {
            "DATABASE_URL": "", "REDIS_URL": "",
            "SQLITE_PATH": str(Path(tmp.name) / "churn.sqlite3"),
        }
    else:
        workers = args.pg_workers
        env = app_env(upstream_port, max_tokens, secret_key=secrets.token_urlsafe(50)) | {
            "DATABASE_URL": recreate_database(args.postgres, args.database),
            "DATABASE_CONN_MAX_AGE": str(args.conn_max_age),
            "REDIS_URL": args.redis,
            "CHANNEL_LAYER": "pubsub",
            "CHANNEL_PREFIX": prefix,
        }
    # Churn counts leaks, not capacity: a start refused as `overloaded` (a loop that
    # lags on a busy machine) would count as a client error without leaking anything.
    env["CHAT_TUNING"] = json.dumps({"max_loop_lag_ms": 0, "max_pending_starts": 0})
    os.environ.update(env)
    env = dict(os.environ)
    manage = [sys.executable, "manage.py"]
    subprocess.run([*manage, "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=env, check=True)
    if config == "postgres":
        subprocess.run([*manage, "check", "--deploy", "--fail-level", "ERROR"], cwd=ROOT,
                       env=env, check=True, capture_output=True)

    import django

    django.setup()
    from django.contrib.auth.models import User
    from django.db import connections
    from django.db.models import Count

    from chat.models import Message, UsageRecord, UserBudget
    from tests.live import LiveServer

    users = [User.objects.create(username=f"churn{i}", password="!") for i in range(args.users)]
    # One user runs many answers at once here; the default budget allows one.
    UserBudget.objects.bulk_create(
        [UserBudget(user=u, max_concurrent=args.sockets + 1) for u in users]
    )
    cookies = session_cookies(users)
    connections.close_all()

    processes = []
    servers: list[LiveServer] = []
    try:
        processes.append(start_upstream(upstream_port, env, ARTIFACTS / f"upstream-{config}.log",
                                        tokens=args.tokens,
                                        tokens_per_second=args.tokens_per_second))
        for n in range(workers):
            servers.append(LiveServer(env, name=f"churn-{config}-worker{n}"))
            servers[-1].start(timeout=60)
        ports = [s.port for s in servers]
        asyncio.run(warm_up(ports, cookies[0], generate=False))
        stats_before = all_workers_answer(workers) if config == "postgres" else None
        # Taken before the warm-up answers: a channel one of them leaves is a leak too.
        redis = ({"prefix": prefix, "before": redis_pubsub(args.redis, prefix)}
                 if config == "postgres" else None)
        asyncio.run(warm_up(ports, cookies[0], generate=True))
        rss = {f"worker{n}": {"before": rss_kb(s.process.pid)} for n, s in enumerate(servers)}
        print(f"{config}: {workers} worker(s), upstream, {args.users} users ready in "
              f"{time.monotonic() - started:.1f} s"
              + (f" ({len(stats_before)} workers answer worker.stats)"
                 if stats_before is not None else "")
              + f"; {args.sockets} sockets over {args.duration:g} s...", flush=True)

        plans = make_plans(args, cookies, ports)
        answer_s = args.tokens / args.tokens_per_second
        end_timeout = max(30.0, 3 * answer_s)
        budget = max(10.0, args.max_seconds - (time.monotonic() - started) - args.settle - 20)
        run_started = time.monotonic()
        records = asyncio.run(run_clients(plans, end_timeout, budget))
        ended = time.monotonic()
        # The figure is defined at this point in time: `settle` s after the last socket.
        time.sleep(args.settle)
        streaming = Message.objects.streaming().count()
        upstream = upstream_stats(upstream_port)
        assistant = Message.objects.filter(role=Message.Role.ASSISTANT)
        db = {
            "streaming": streaming,
            "assistant_rows": assistant.count(),
            "usage_records": UsageRecord.objects.count(),
            "statuses": {row["status"]: row["n"] for row in
                         assistant.order_by().values("status").annotate(n=Count("id"))},
        }
        for n, s in enumerate(servers):
            rss[f"worker{n}"]["after"] = rss_kb(s.process.pid)
        if redis is not None:
            # Before the stats question: its reply channel would count otherwise.
            redis["after"] = redis_pubsub(args.redis, prefix)
        stats = all_workers_answer(workers, tries=3) if config == "postgres" else None
        worker_logs = {}
        for n, s in enumerate(servers):
            worker_logs[f"worker{n}"] = {**log_errors(s.log_path),
                                         "exit_code": s.process.poll(), "log": str(s.log_path)}
        connections.close_all()
        return summarize(args, config, workers, records, db, upstream, rss, redis, stats,
                         worker_logs, ended - run_started, os.getloadavg())
    finally:
        for server in servers:
            server.stop()
        for process in processes:
            stop_process(process)
        if config == "postgres":
            cleanup_redis(args.redis, prefix)
        tmp.cleanup()


# --- orchestration --------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", choices=["both", *CONFIGS], default="both")
    parser.add_argument("--sockets", type=int, default=300)
    parser.add_argument("--duration", type=float, default=60,
                        help="seconds over which the sockets are opened")
    parser.add_argument("--tokens", type=int, default=200, help="tokens per answer")
    parser.add_argument("--tokens-per-second", type=float, default=20)
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--settle", type=float, default=5,
                        help="seconds after the last socket before counting what is left")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--pg-workers", type=int, default=2)
    parser.add_argument("--conn-max-age", type=int, default=60,
                        help="DATABASE_CONN_MAX_AGE of the PostgreSQL workers (s)")
    parser.add_argument("--postgres", default="postgres://postgres@127.0.0.1:5432")
    parser.add_argument("--database", default="bench_churn",
                        help="PostgreSQL database of the bench (dropped and created)")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--max-seconds", type=float, default=150,
                        help="bound of one configuration, setup included")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.sockets < 1 or args.duration <= 0 or args.users < 1 or args.tokens < 1:
        parser.error("--sockets, --duration, --users and --tokens must be positive")
    return args


def run_child(args, config: str, argv: list[str]) -> dict | None:
    """Run one configuration in a process of its own (Django is set up once per
    process, on one database), in its own process group so a child over its time limit
    is stopped with everything it started. Returns its figures, or None."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as out:
        path = Path(out.name)
    cmd = [sys.executable, "-m", "bench.churn", *argv, "--config", config, "--json", str(path)]
    child = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
    try:
        child.wait(args.max_seconds + 60)
    except subprocess.TimeoutExpired:
        print(f"{config}: over its time limit, stopped", file=sys.stderr)
        os.killpg(child.pid, signal.SIGTERM)
        try:
            child.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    try:
        text = path.read_text()
        return json.loads(text) if text else None
    finally:
        path.unlink(missing_ok=True)


def strip_options(argv: list[str], names: set[str]) -> list[str]:
    """``argv`` without the options ``names`` and their values."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item in names:
            skip = True
        elif not any(item.startswith(f"{name}=") for name in names):
            out.append(item)
    return out


def print_table(summaries: list[dict]) -> None:
    """One markdown row per configuration (the table of docs/scale.md)."""
    print("\n| configuration | sockets (stop / disconnect / wait) | client errors | 1011 closes "
          "(other abnormal) | rows `streaming` after 5 s | upstream open | usage records / "
          "assistant rows | worker RSS before → after (MiB) | Redis channels (subscriptions) "
          "before → after | generations left | load average |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for s in summaries:
        a = s["actions"]
        rss = " + ".join(f"{mib(v['before'])} → {mib(v['after'])}" for v in s["rss_kb"].values())
        redis = s["redis"]
        redis_text = ("n/a" if redis is None else
                      f"{redis['before']['channels']} ({redis['before']['subscribers']}) → "
                      f"{redis['after']['channels']} ({redis['after']['subscribers']})")
        name = (f"defaults, {s['workers']} worker" if s["config"] == "defaults"
                else f"PostgreSQL + Redis, {s['workers']} workers")
        print(f"| {name} | {s['sockets']} ({a.get('stop', 0)} / {a.get('disconnect', 0)} / "
              f"{a.get('wait', 0)}) | {s['client_errors']} | {s['closes_1011']} "
              f"({s['abnormal_closes'] - s['closes_1011']}) | {s['streaming_after_settle']} | "
              f"{s['upstream_open']} | {s['usage_records']} / {s['assistant_rows']} | {rss} | "
              f"{redis_text} | "
              f"{'n/a' if s['generations_left'] is None else s['generations_left']} | "
              f"{' '.join(f'{x:g}' for x in s['load_average'])} |")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.config != "both":
        try:
            summary = run_config(args, args.config)
        except Exception as exc:  # noqa: BLE001 - the bench could not run: exit 2
            print(f"bench.churn {args.config}: could not run: {type(exc).__name__}: {exc}",
                  file=sys.stderr)
            return 2
        print_report(summary)
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=2))
        return 1 if summary["targets_missed"] else 0
    child_argv = strip_options(argv, {"--config", "--json"})
    summaries, failed = [], []
    for config in CONFIGS:
        summary = run_child(args, config, child_argv)
        if summary is None:
            failed.append(config)
        else:
            summaries.append(summary)
    print_table(summaries)
    for config in failed:
        print(f"{config}: the bench could not run (see above)")
    for s in summaries:
        verdict = "; ".join(s["targets_missed"]) or "all targets met"
        print(f"{s['config']}: {verdict}")
    if args.json:
        Path(args.json).write_text(json.dumps(summaries, indent=2))
    return 2 if failed else 1 if any(s["targets_missed"] for s in summaries) else 0


if __name__ == "__main__":
    sys.exit(main())
