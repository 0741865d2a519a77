"""A rolling deploy, measured: ``python -m bench.deploy``.

Two workers (A, B) on a fresh PostgreSQL database and one Redis, streaming from
``bench.upstream``:

1. **Deploy**: ``--answers`` answers (one user each) stream on A; A gets SIGTERM; every
   tab reconnects to B as soon as its socket closes (what a load balancer does) and
   follows its answer to the end. Prints the answers completed / interrupted /
   cancelled (as the tabs and the database saw them), the close codes the tabs got,
   the time A took to exit after the signal and after its last answer ended.
2. **Reconnect storm**: ``--storm`` sockets connect to B spread over ``--storm-window``
   seconds (the tabs of a stopped worker coming back); prints how long each waited for
   its ``state`` frame (percentiles, max), how many failed or took over 10 s.

Options: ``--grace`` (A's CHAT_SHUTDOWN_GRACE_S, s), ``--tokens`` per answer at
``--tokens-per-second``. Environment: ``BENCH_POSTGRES`` (``postgres://user@host:port``,
default ``postgres://postgres@127.0.0.1:5432``), ``BENCH_REDIS`` (default
``redis://127.0.0.1:6379/13``). Logs in artifacts/bench/deploy-*.log.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import time
import uuid
from collections import Counter

import websockets

from bench.common import (
    ARTIFACTS,
    app_env,
    cpu_seconds,
    drop_database,
    fmt_ms,
    free_port,
    percentile,
    prepare_database,
    recreate_database,
    start_daphne,
    start_upstream,
    stop_process,
    wait_port,
)

# Tabs per user in the storm (the per-user socket cap is 20 per worker by default).
TABS_PER_USER = 4


async def follow(port_a: int, port_b: int, cookie: str, out: dict) -> dict:
    """One tab: starts an answer on A, sets ``out["streaming"]`` (an Event) once text
    comes, and on the close of its socket reconnects to B (same tab id) and reads until
    ``generation.end``; fills ``out`` (close_code, status) and returns it."""
    conversation, tab = uuid.uuid4(), uuid.uuid4().hex

    async def connect(port):
        return await websockets.connect(
            f"ws://127.0.0.1:{port}/ws/conversations/{conversation}/?tab={tab}",
            additional_headers={"Cookie": cookie, "Origin": f"http://127.0.0.1:{port}"},
            max_queue=None, ping_interval=None, open_timeout=30)

    ws = await connect(port_a)
    await ws.send(json.dumps({"type": "message", "content": "deploy bench"}))
    try:
        async for raw in ws:
            frame = json.loads(raw)
            if frame["type"] == "delta":
                out["streaming"].set()
            elif frame["type"] == "generation.end":
                out["status"] = frame["status"]
                return out
    except websockets.ConnectionClosed:
        pass
    out["close_code"] = ws.close_code
    ws = await connect(port_b)
    try:
        async for raw in ws:
            frame = json.loads(raw)
            if frame["type"] == "generation.end":
                out["status"] = frame["status"]
                break
            if frame["type"] == "state" and not frame.get("generation") and \
                    frame["messages"] and frame["messages"][-1]["role"] == "assistant" and \
                    frame["messages"][-1]["status"] != "streaming":
                out["status"] = frame["messages"][-1]["status"]  # ended before the reconnect
                break
    finally:
        await ws.close()
    return out


async def storm(port: int, cookies: list[str], sockets: int, window_s: float,
                pid: int | None = None) -> dict:
    """``sockets`` sockets to ``port`` started evenly over ``window_s`` s; ms from each
    connect to its ``state`` frame, and the CPU time (s) the worker ``pid`` and this
    client used meanwhile (on a shared machine the two compete for the cores)."""
    waits: list[float] = []
    opens: list[float] = []
    failures: Counter = Counter()
    opened: list = []
    began = time.monotonic()
    cpu = cpu_seconds(pid) if pid else 0.0
    client_cpu = time.process_time()

    async def one(i: int):
        await asyncio.sleep(window_s * i / sockets)
        start = time.monotonic()
        try:
            ws = await websockets.connect(
                f"ws://127.0.0.1:{port}/ws/conversations/{uuid.uuid4()}/?tab={uuid.uuid4().hex}",
                additional_headers={"Cookie": cookies[i % len(cookies)],
                                    "Origin": f"http://127.0.0.1:{port}"},
                max_queue=None, ping_interval=None, open_timeout=30)
            opened.append(ws)
            opens.append((time.monotonic() - start) * 1000)
            async with asyncio.timeout(30):
                while json.loads(await ws.recv())["type"] != "state":
                    pass
            waits.append((time.monotonic() - start) * 1000)
        except websockets.InvalidStatus as exc:
            # An HTTP answer instead of 101: daphne's 403 for a handshake the
            # application did not accept in time, 503, ...
            failures[f"InvalidStatus {exc.response.status_code}"] += 1
        except Exception as exc:  # noqa: BLE001 - counted by kind
            failures[type(exc).__name__] += 1

    await asyncio.gather(*(one(i) for i in range(sockets)))
    elapsed = time.monotonic() - began
    cpu = cpu_seconds(pid) - cpu if pid else None
    client_cpu = time.process_time() - client_cpu
    await asyncio.gather(*(ws.close() for ws in opened), return_exceptions=True)
    return {"sockets": sockets, "window_s": window_s, "all_done_s": round(elapsed, 2),
            "state_p50_ms": percentile(waits, 50), "state_p99_ms": percentile(waits, 99),
            "state_max_ms": max(waits, default=None),
            "open_p50_ms": percentile(opens, 50), "open_p99_ms": percentile(opens, 99),
            "over_10s": sum(w > 10_000 for w in waits), "failed": dict(failures),
            "worker_cpu_s": cpu and round(cpu, 2), "client_cpu_s": round(client_cpu, 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--answers", type=int, default=20,
                        help="answers streaming on A when it is stopped (0: storm only)")
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--tokens-per-second", type=float, default=20)
    parser.add_argument("--grace", type=float, default=60)
    parser.add_argument("--storm", type=int, default=2000)
    parser.add_argument("--storm-window", type=float, default=1.0)
    args = parser.parse_args(argv)
    postgres = os.environ.get("BENCH_POSTGRES", "postgres://postgres@127.0.0.1:5432")
    redis = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/13")
    name = f"bench_deploy_{os.getpid()}"
    up_port, port_a, port_b = free_port(), free_port(), free_port()
    # Production settings (DEBUG off: no query log), as the workers of a deploy run.
    env = {**os.environ, **app_env(up_port, args.tokens, secret_key=secrets.token_urlsafe(50)),
           "DATABASE_URL": recreate_database(postgres, name), "REDIS_URL": redis,
           "CHANNEL_PREFIX": f"bd{os.getpid()}"}
    processes = []
    try:
        # Many users with a few tabs each, as after a real deploy: within the per-user
        # socket cap (CHAT_MAX_SOCKETS_PER_USER) and frame rates, all left at defaults.
        users = max(args.answers, -(-args.storm // TABS_PER_USER))
        cookies = prepare_database(env, users, "deploy")
        processes.append(start_upstream(up_port, env, ARTIFACTS / "deploy-upstream.log",
                                        tokens_per_second=args.tokens_per_second,
                                        tokens=args.tokens))
        a = start_daphne(port_a, {**env, "CHAT_SHUTDOWN_GRACE_S": str(args.grace)},
                         ARTIFACTS / "deploy-a.log")
        b = start_daphne(port_b, env, ARTIFACTS / "deploy-b.log")
        processes += [a, b]
        wait_port(port_a, a, "A")
        wait_port(port_b, b, "B")
        report = asyncio.run(run(args, a, b, port_a, port_b, cookies))
        print(json.dumps(report, indent=2, default=str))
        print_summary(report)
    finally:
        for process in processes:
            stop_process(process)
        drop_database(postgres, name)
    return 0


async def run(args, a, b, port_a: int, port_b: int, cookies: list[str]) -> dict:
    deploy = await rolling_restart(args, a, port_a, port_b, cookies) if args.answers else None
    return {"deploy": deploy,
            "storm": await storm(port_b, cookies, args.storm, args.storm_window, b.pid)}


async def rolling_restart(args, a, port_a: int, port_b: int, cookies: list[str]) -> dict:
    """The deploy of the module docstring (1.); its figures."""
    outs = [{"close_code": None, "status": None, "streaming": asyncio.Event()}
            for _ in range(args.answers)]
    tabs = [asyncio.create_task(follow(port_a, port_b, cookies[i], outs[i]))
            for i in range(args.answers)]
    # Every answer streams before the signal.
    await asyncio.wait_for(asyncio.gather(*(o["streaming"].wait() for o in outs)), 60)
    await asyncio.sleep(1)
    sent = time.monotonic()
    a.send_signal(signal.SIGTERM)
    results = await asyncio.gather(*tabs)
    last_end = time.monotonic()
    while a.poll() is None and time.monotonic() - sent < args.grace + 30:
        await asyncio.sleep(0.05)
    exited = time.monotonic()
    deploy = {
        "answers": args.answers,
        "status": dict(Counter(r["status"] for r in results)),
        "close_codes": dict(Counter(r["close_code"] for r in results)),
        "a_exit_after_signal_s": round(exited - sent, 2),
        "a_exit_after_last_end_s": round(exited - last_end, 2),
        "a_returncode": a.returncode,
    }
    return deploy


def print_summary(report: dict) -> None:
    d, s = report["deploy"], report["storm"]
    if d is not None:
        print(f"\ndeploy: {d['answers']} answers: completed {d['status'].get('completed', 0)}, "
              f"interrupted {d['status'].get('interrupted', 0)}, "
              f"cancelled {d['status'].get('cancelled', 0)}; close codes {d['close_codes']}; "
              f"A exited {d['a_exit_after_signal_s']} s after SIGTERM, "
              f"{d['a_exit_after_last_end_s']} s after its last answer ended")
    print(f"storm: {s['sockets']} sockets over {s['window_s']} s: open (101) p50 "
          f"{fmt_ms(s['open_p50_ms'])}, p99 {fmt_ms(s['open_p99_ms'])}; state p50 "
          f"{fmt_ms(s['state_p50_ms'])}, p99 {fmt_ms(s['state_p99_ms'])}, max "
          f"{fmt_ms(s['state_max_ms'])}; over 10 s {s['over_10s']}; failed {s['failed']}; "
          f"all done in {s['all_done_s']} s; CPU: worker {s['worker_cpu_s']} s, "
          f"client {s['client_cpu_s']} s")


if __name__ == "__main__":
    raise SystemExit(main())
