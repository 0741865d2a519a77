"""Load test: N daphne workers on Redis + PostgreSQL, M concurrent streams, real sockets.

    python -m bench.load --workers 2 --streams 200 --tokens-per-second 20

What it starts (loopback only, everything stopped at the end):

- a PostgreSQL database of its own (``--database``, default ``bench_chat``, dropped and
  created again, then migrated) on ``--postgres`` (default 127.0.0.1:5432);
- a loopback upstream (``bench.upstream``: ``chat.demo_model.UpstreamServer`` whose
  tokens carry their index and emission time) in its own process, at
  ``--tokens-per-second``, ``--tokens`` tokens per answer;
- ``--workers`` daphne processes (``DEBUG=0``, after ``manage.py check --deploy``) on
  ``--redis`` with a channel prefix of their own, layer ``--layer`` (core/pubsub);
- ``--streams`` streams, each by its own user, started over ``--ramp`` seconds from
  ``--client-procs`` client processes: the owner's socket on a random worker, with
  probability ``--watch`` a watcher of the same conversation on another worker; with
  probability ``--stop`` the run is stopped (by the watcher when there is one, else the
  owner), with probability ``--disconnect`` the owner closes its socket mid-stream.

What it prints: tokens sent vs received by every socket that stayed to the end (lost,
duplicated, out of order), client-visible seq gaps and server repairs, p50/p99 delta
latency (upstream write to client receive, wall clock), stop and disconnect to upstream
close latency p50/p99, runs left ``streaming``, upstream connections left open, tasks
left in the workers, usage records vs runs. Bounded by ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import subprocess
import sys
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

from bench.common import (
    ARTIFACTS,
    ROOT,
    Client,
    app_env,
    cleanup_redis,
    cpu_snapshot,
    fmt_ms,
    free_port,
    make_session_cookies,
    parse_tokens,
    percentile,
    query_workers,
    recreate_database,
    service_pids,
    start_daphne,
    start_upstream,
    stop_process,
    upstream_stats,
    wait_port,
)


# --- the plan -------------------------------------------------------------------------
@dataclass
class Plan:
    """One stream: who connects where, and what happens to the run."""

    index: int
    cookie: str
    owner_port: int
    watcher_port: int | None
    action: str  # complete | stop | disconnect
    action_after_s: float  # after the first delta
    stop_by_watcher: bool
    start_delay_s: float


def make_plans(args, cookies: list[str], ports: list[int]) -> list[Plan]:
    rng = random.Random(args.seed)
    duration = args.tokens / args.tokens_per_second
    plans = []
    for index, cookie in enumerate(cookies):
        owner = rng.choice(ports)
        others = [p for p in ports if p != owner] or [owner]
        watcher = rng.choice(others) if rng.random() < args.watch else None
        roll = rng.random()
        action = (
            "stop" if roll < args.stop
            else "disconnect" if roll < args.stop + args.disconnect
            else "complete"
        )
        plans.append(Plan(
            index=index, cookie=cookie, owner_port=owner, watcher_port=watcher,
            action=action, action_after_s=rng.uniform(0.2, 0.7) * duration,
            stop_by_watcher=watcher is not None and rng.random() < 0.5,
            start_delay_s=rng.uniform(0, args.ramp),
        ))
    return plans


# --- clients --------------------------------------------------------------------------
async def run_stream(plan: Plan, end_timeout: float) -> dict:
    await asyncio.sleep(plan.start_delay_s)
    conversation = str(uuid.uuid4())
    result = {"index": plan.index, "action": plan.action, "acted_at": None, "sockets": []}
    owner, watcher = Client("owner"), None
    try:
        if plan.watcher_port is not None:
            watcher = Client("watcher")
            await watcher.open(plan.watcher_port, conversation, plan.cookie)
        await owner.open(plan.owner_port, conversation, plan.cookie)
        await owner.send({"type": "message", "content": f"bench-{plan.index}"})
        await asyncio.wait_for(owner.started.wait(), end_timeout)
        if watcher is not None:
            watcher.record.message_id = owner.record.message_id
        if plan.action != "complete":
            await asyncio.wait_for(owner.first_delta.wait(), end_timeout)
            await asyncio.sleep(plan.action_after_s)
            if not owner.ended.is_set():
                if plan.action == "stop":
                    sender = watcher if plan.stop_by_watcher else owner
                    result["acted_at"] = time.monotonic()
                    await sender.send({"type": "stop"})
                else:
                    owner.record.left_early = True
                    result["acted_at"] = time.monotonic()
                    await owner.ws.close()
        waiting = [c for c in (owner, watcher) if c is not None and not c.record.left_early]
        await asyncio.wait_for(
            asyncio.gather(*(c.ended.wait() for c in waiting)), end_timeout
        )
        for client in waiting:
            if client.unsynced:
                client.synced.clear()
                await asyncio.wait_for(client.synced.wait(), 10)
    except Exception as exc:  # noqa: BLE001
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        for client in (owner, watcher):
            if client is not None:
                await client.close()
    result["message_id"] = owner.record.message_id
    result["sockets"] = [asdict(c.record) for c in (owner, watcher) if c is not None]
    return result


def run_client_shard(plans: list[Plan], end_timeout: float) -> list[dict]:
    """Entry point of a client process: run its streams, return their records."""

    async def main():
        return await asyncio.gather(*(run_stream(p, end_timeout) for p in plans))

    return asyncio.run(main())


# --- figures --------------------------------------------------------------------------
def summarize(args, results, saved, upstream_stats, workers, elapsed_s) -> dict:
    """Figures of one run (see the module docstring)."""
    requests = {r["tag"]: r for r in upstream_stats["requests"]}
    sent = received = lost = duplicated = out_of_order = phantom = 0
    gaps = dups = repairs = sockets_checked = 0
    latencies: list[float] = []
    stop_ms: list[float] = []
    disconnect_ms: list[float] = []
    errors = []
    for result in results:
        if result.get("error"):
            errors.append(result["error"])
        expected = saved.get(result.get("message_id"), {}).get("tokens")
        for sock in result["sockets"]:
            latencies.extend(sock["latencies_ms"])
            gaps += sock["seq_gaps"]
            dups += sock["seq_dups"]
            repairs += max(0, sock["states"] - 1)
            if sock["error"]:
                errors.append(f"{sock['role']}: {sock['error']}")
            if sock["left_early"] or expected is None or sock["end_status"] is None:
                continue
            sockets_checked += 1
            got = sock["tokens"]
            sent += len(expected)
            received += len(got)
            lost += len(set(expected) - set(got))
            phantom += len(set(got) - set(expected))
            duplicated += len(got) - len(set(got))
            out_of_order += sum(1 for a, b in zip(got, got[1:], strict=False) if b < a)
        request = requests.get(f"bench-{result['index']}")
        if result["acted_at"] and request and request["client_closed_at"]:
            ms = (request["client_closed_at"] - result["acted_at"]) * 1000
            (stop_ms if result["action"] == "stop" else disconnect_ms).append(ms)
    statuses: dict[str, int] = {}
    for row in saved.values():
        statuses[row["status"]] = statuses.get(row["status"], 0) + 1
    return {
        "config": {
            "workers": args.workers, "streams": args.streams, "layer": args.layer,
            "tokens_per_second": args.tokens_per_second, "tokens": args.tokens,
            "coalesce_ms": args.coalesce_ms, "watch": args.watch, "stop": args.stop,
            "disconnect": args.disconnect, "client_procs": args.client_procs,
            "conn_max_age": args.conn_max_age,
        },
        "elapsed_s": round(elapsed_s, 1),
        "sockets_checked": sockets_checked,
        "tokens_sent": sent, "tokens_received": received, "lost": lost,
        "duplicated": duplicated, "out_of_order": out_of_order, "phantom": phantom,
        "client_seq_gaps": gaps, "client_seq_dups": dups, "server_repairs": repairs,
        "delta_latency_ms": {"p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
                             "max": max(latencies) if latencies else None},
        "stop_to_upstream_close_ms": {"n": len(stop_ms), "p50": percentile(stop_ms, 50),
                                      "p99": percentile(stop_ms, 99)},
        "disconnect_to_upstream_close_ms": {"n": len(disconnect_ms),
                                            "p50": percentile(disconnect_ms, 50),
                                            "p99": percentile(disconnect_ms, 99)},
        "runs": len(saved), "statuses": statuses,
        "runs_left_streaming": statuses.get("streaming", 0),
        "usage_records": sum(1 for row in saved.values() if row["usage"]),
        "upstream_requests": len(upstream_stats["requests"]),
        "upstream_open": upstream_stats["open_streams"],
        "workers_answering": len(workers),
        "generation_tasks_left": sum(w["generation_tasks"] for w in workers),
        "generations_left": sum(w["generations"] for w in workers),
        "errors": len(errors), "error_samples": errors[:5],
        "stuck_stacks": [w.get("stacks") for w in workers if w.get("stacks")],
        "streams": [
            {k: r.get(k) for k in ("index", "action", "message_id", "error")}
            | {"status": saved.get(r.get("message_id"), {}).get("status"),
               "upstream": requests.get(f"bench-{r['index']}")}
            for r in results
        ],
    }


def print_report(s: dict) -> None:
    c = s["config"]
    print(f"\n=== bench.load: {c['workers']} workers, {c['streams']} streams at "
          f"{c['tokens_per_second']:g} tokens/s x {c['tokens']} tokens, layer {c['layer']}, "
          f"coalesce {c['coalesce_ms']} ms ({s['elapsed_s']} s)")
    print(f"tokens sent vs received : {s['tokens_sent']} vs {s['tokens_received']} over "
          f"{s['sockets_checked']} sockets that stayed to the end")
    print(f"  lost / duplicated / out of order / unknown : {s['lost']} / {s['duplicated']} / "
          f"{s['out_of_order']} / {s['phantom']}")
    print(f"  seq gaps seen by clients: {s['client_seq_gaps']}, seq dups: "
          f"{s['client_seq_dups']}, server repairs (extra state frames): {s['server_repairs']}")
    lat = s["delta_latency_ms"]
    print(f"delta latency           : p50 {fmt_ms(lat['p50'])}, p99 {fmt_ms(lat['p99'])}, "
          f"max {fmt_ms(lat['max'])}")
    st, dc = s["stop_to_upstream_close_ms"], s["disconnect_to_upstream_close_ms"]
    print(f"stop -> upstream close  : p50 {fmt_ms(st['p50'])}, p99 {fmt_ms(st['p99'])} "
          f"(n={st['n']})")
    print(f"disconnect -> close     : p50 {fmt_ms(dc['p50'])}, p99 {fmt_ms(dc['p99'])} "
          f"(n={dc['n']})")
    print(f"runs                    : {s['runs']} {s['statuses']}")
    print(f"runs left streaming     : {s['runs_left_streaming']}")
    print(f"upstream open streams   : {s['upstream_open']} (of {s['upstream_requests']})")
    print(f"tasks left in workers   : {s['generation_tasks_left']} generation tasks, "
          f"{s['generations_left']} generations ({s['workers_answering']} workers answered)")
    print(f"usage records vs runs   : {s['usage_records']} vs {s['runs']}")
    print(f"client errors           : {s['errors']} {s['error_samples']}")
    if "cpu_s" in s:
        cpu = ", ".join(f"{k} {v}" for k, v in s["cpu_s"].items())
        print(f"CPU seconds used        : {cpu} (in {s['elapsed_s']} s on "
              f"{os.cpu_count()} cores; load average {s['machine_load']})")


# --- orchestration --------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--tokens-per-second", type=float, default=20)
    parser.add_argument("--tokens", type=int, default=200, help="tokens per answer")
    parser.add_argument("--ramp", type=float, default=5, help="seconds to start all streams")
    parser.add_argument("--watch", type=float, default=0.2)
    parser.add_argument("--stop", type=float, default=0.1)
    parser.add_argument("--disconnect", type=float, default=0.1)
    parser.add_argument("--layer", choices=["core", "pubsub"], default="pubsub")
    parser.add_argument("--coalesce-ms", type=int, default=30)
    parser.add_argument("--capacity", type=int, default=1000)
    parser.add_argument("--conn-max-age", type=int, default=0,
                        help="DATABASE_CONN_MAX_AGE of the workers (s)")
    parser.add_argument("--client-procs", type=int, default=1)
    parser.add_argument("--postgres", default="postgres://postgres@127.0.0.1:5432")
    parser.add_argument("--database", default="bench_chat")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--max-seconds", type=float, default=300)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", help="also write the figures to this file")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    database_url = recreate_database(args.postgres, args.database)
    upstream_port = free_port()
    env = {
        **os.environ,
        **app_env(upstream_port, max(args.tokens + 10, 64),
                  secret_key=secrets.token_urlsafe(50)),
        "DATABASE_URL": database_url,
        "DATABASE_CONN_MAX_AGE": str(args.conn_max_age),
        "REDIS_URL": args.redis,
        "CHANNEL_PREFIX": prefix,
        "CHANNEL_CAPACITY": str(args.capacity),
        "CHANNEL_LAYER": args.layer,
        "CHAT_TUNING": json.dumps({"delta_coalesce_ms": args.coalesce_ms}),
    }
    os.environ.update(env)
    manage = [sys.executable, "manage.py"]
    subprocess.run([*manage, "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=env, check=True)
    check = subprocess.run([*manage, "check", "--deploy", "--fail-level", "ERROR"],
                           cwd=ROOT, env=env, capture_output=True, text=True)
    if check.returncode:
        print(check.stderr, file=sys.stderr)
        return 2

    import django

    django.setup()
    cookies = make_session_cookies(args.streams)

    processes: list[subprocess.Popen] = []
    try:
        upstream = start_upstream(
            upstream_port, env, ARTIFACTS / "upstream.log",
            tokens_per_second=args.tokens_per_second, tokens=args.tokens,
        )
        processes.append(upstream)
        ports = []
        for n in range(args.workers):
            port = free_port()
            worker = start_daphne(port, env, ARTIFACTS / f"worker{n}.log")
            processes.append(worker)
            ports.append((port, worker))
        for port, worker in ports:
            wait_port(port, worker, f"worker on {port}")
        print(f"{args.workers} workers, upstream, {args.streams} users ready in "
              f"{time.monotonic() - started:.1f} s; streaming...", flush=True)

        plans = make_plans(args, cookies, [p for p, _ in ports])
        duration = args.tokens / args.tokens_per_second
        end_timeout = max(60.0, duration * 4)
        shards = [plans[i::args.client_procs] for i in range(args.client_procs)]
        run_started = time.monotonic()
        tracked = {
            **{f"worker{n}": [w.pid] for n, (_, w) in enumerate(ports)},
            "upstream": [upstream.pid],
        }
        cpu_before = cpu_snapshot({**tracked, **service_pids()})
        self_before = os.times()
        budget = max(10.0, args.max_seconds - (run_started - started) - 30)
        with ProcessPoolExecutor(args.client_procs, mp_context=get_context("fork")) as pool:
            futures = [pool.submit(run_client_shard, shard, end_timeout) for shard in shards]
            results = []
            for future in futures:
                remaining = max(1.0, budget - (time.monotonic() - run_started))
                results.extend(future.result(timeout=remaining))
        elapsed = time.monotonic() - run_started
        cpu_after = cpu_snapshot({**tracked, **service_pids()})
        self_after = os.times()
        cpu = {name: round(cpu_after[name] - cpu_before.get(name, 0), 1) for name in cpu_after}
        cpu["clients"] = round(
            (self_after.children_user + self_after.children_system)
            - (self_before.children_user + self_before.children_system), 1
        )

        # Let ends and usage records land (a stopped run finishes in milliseconds).
        from chat.models import Message

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and Message.objects.streaming().exists():
            time.sleep(0.5)
        saved = {}
        for message in Message.objects.filter(role="assistant").select_related("usage"):
            try:
                usage = message.usage
            except Exception:  # noqa: BLE001 - RelatedObjectDoesNotExist
                usage = None
            saved[str(message.id)] = {
                "status": message.status,
                "tokens": [k for k, _ in parse_tokens(message.content)],
                "usage": usage is not None,
            }
        requests = upstream_stats(upstream_port)
        workers = asyncio.run(query_workers(args.workers))
        summary = summarize(args, results, saved, requests, workers, elapsed)
        summary["cpu_s"] = cpu
        loadavg = os.getloadavg()
        summary["machine_load"] = [round(x, 1) for x in loadavg]
        print_report(summary)
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=2))
        return 0
    finally:
        for process in reversed(processes):
            stop_process(process)
        cleanup_redis(args.redis, prefix)


if __name__ == "__main__":
    sys.exit(main())
