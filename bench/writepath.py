"""Micro-benchmark of the socket write path alone: one daphne worker, N websocket clients.

The worker serves :data:`app` (no Django, no channel layer): every ``--interval``
seconds one task sends a small text frame to every connected socket, as a streaming
answer does per delta. The clients (one separate process) only count frames. The
figure is the worker's CPU (user+system from ``/proc/<pid>/stat``) per 1000 frames over
``--duration`` seconds after a warm-up, for Twisted's own write and for
:mod:`chatproject.writethrough`, alternated ``--pairs`` times::

    flock /tmp/bench.lock .venv/bin/python -m bench.writepath --clients 300 --pairs 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_sockets: set = set()
_ticker: asyncio.Task | None = None


async def _tick(interval: float) -> None:
    """Send one frame to every socket every ``interval`` seconds."""
    seq = 0
    while True:
        await asyncio.sleep(interval)
        seq += 1
        text = f'{{"type":"delta","seq":{seq},"text":" token"}}'
        for send in list(_sockets):
            await send({"type": "websocket.send", "text": text})


async def app(scope, receive, send):
    """ASGI app: accept websockets, register them with the ticker."""
    global _ticker
    if scope["type"] != "websocket":
        return
    if _ticker is None:
        from chatproject import writethrough

        writethrough.install()
        _ticker = asyncio.ensure_future(_tick(float(os.environ.get("WRITEPATH_INTERVAL", "0.05"))))
    while True:
        message = await receive()
        if message["type"] == "websocket.connect":
            await send({"type": "websocket.accept"})
            _sockets.add(send)
        elif message["type"] == "websocket.disconnect":
            _sockets.discard(send)
            return


async def _clients(port: int, n: int, seconds: float) -> int:
    """Connect ``n`` clients, count frames for ``seconds``; returns the count."""
    import websockets

    count = 0
    stop = asyncio.Event()

    async def one() -> None:
        nonlocal count
        async with websockets.connect(f"ws://127.0.0.1:{port}/", max_queue=None) as ws:
            while not stop.is_set():
                try:
                    await asyncio.wait_for(ws.recv(), 0.5)
                    count += 1
                except TimeoutError:
                    pass

    tasks = [asyncio.ensure_future(one()) for _ in range(n)]
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    return count


def _cpu(pid: int) -> float:
    """User+system CPU seconds of ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(write_through: bool, clients: int, duration: float, port: int, interval: float) -> dict:
    """One row: start a worker, connect the clients, measure; returns the figures."""
    env = {**os.environ, "CHAT_WRITE_THROUGH": "1" if write_through else "0",
           "WRITEPATH_INTERVAL": str(interval), "DJANGO_SETTINGS_MODULE": "chatproject.settings"}
    worker = subprocess.Popen([sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port),
                               "bench.writepath:app"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.5)
        warmup = 3.0
        code = ("import asyncio, bench.writepath as w; "
                f"print(asyncio.run(w._clients({port}, {clients}, {warmup + duration + 1})))")
        client = subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=ROOT, stdout=subprocess.PIPE, text=True)
        time.sleep(warmup)
        cpu0, t0 = _cpu(worker.pid), time.monotonic()
        time.sleep(duration)
        cpu1, t1 = _cpu(worker.pid), time.monotonic()
        client.wait(timeout=60)
        frames_expected = clients * (t1 - t0) / interval
        return {"write_through": write_through, "cpu_s": cpu1 - cpu0,
                "cpu_per_1000_frames": 1000 * (cpu1 - cpu0) / frames_expected,
                "frames_total": int(client.stdout.read().strip() or 0),
                "load": os.getloadavg()[0]}
    finally:
        worker.terminate()
        worker.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=300)
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per row")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between frames")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--port", type=int, default=8731)
    args = parser.parse_args()
    for i in range(args.pairs):
        order = (False, True) if i % 2 == 0 else (True, False)
        for wt in order:
            r = run(wt, args.clients, args.duration, args.port, args.interval)
            print(f"write_through={int(r['write_through'])} cpu={r['cpu_s']:.2f}s "
                  f"per1000frames={r['cpu_per_1000_frames'] * 1000:.1f}ms "
                  f"frames={r['frames_total']} load1={r['load']:.2f}", flush=True)


if __name__ == "__main__":
    main()
