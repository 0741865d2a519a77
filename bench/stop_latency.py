"""How long after a stop does the provider see its connection closed?

    python -m bench.stop_latency [--runs 20] [--mode stop|disconnect|second-tab]

Starts the app as users run it (daphne, in a subprocess, on a fresh SQLite database
under /tmp) pointed at a loopback OpenAI-compatible upstream in this process, then for
each run: opens a WebSocket with a real session, sends a message, waits for a few
deltas, and stops the run (a ``stop`` frame, closing the socket, or a ``stop`` frame
from a second socket). It prints, in ms, the time from the stop to the moment the
upstream saw the client close its connection, and to the ``generation.end`` frame.
Loopback only; it ends by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def setup_django(db_path: str) -> None:
    os.environ["DJANGO_SETTINGS_MODULE"] = "chatproject.settings"
    os.environ["SQLITE_PATH"] = db_path
    os.environ.pop("DATABASE_URL", None)
    os.environ.pop("REDIS_URL", None)
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def make_session_cookie() -> str:
    from django.contrib.auth import get_user_model
    from django.test import Client

    user, _ = get_user_model().objects.get_or_create(username="bench")
    client = Client()
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}"


async def one_run(server, upstream, cookie: str, mode: str, deltas_before_stop: int) -> dict:
    import websockets

    conversation = uuid.uuid4()
    url = f"{server.ws_url}/ws/conversations/{conversation}/"
    headers = {"Cookie": cookie, "Origin": server.url}
    async with websockets.connect(url, additional_headers=headers) as ws:
        second = None
        if mode == "second-tab":
            second = await websockets.connect(url, additional_headers=headers)
            await second.recv()
        await ws.recv()  # state
        await ws.send(json.dumps({"type": "message", "content": "Explain stopping, at length"}))
        seen = 0
        while seen < deltas_before_stop:
            frame = json.loads(await ws.recv())
            seen += frame["type"] == "delta"
        request = upstream.requests[-1]
        stopped_at = time.monotonic()
        if mode == "stop":
            await ws.send(json.dumps({"type": "stop"}))
        elif mode == "second-tab":
            await second.send(json.dumps({"type": "stop"}))
        else:
            await ws.close()
        end_at = None
        watcher = second if mode == "disconnect" else ws
        if watcher is not None:
            while True:
                frame = json.loads(await watcher.recv())
                if frame["type"] == "generation.end":
                    end_at = time.monotonic()
                    break
        if second is not None:
            await second.close()
    await upstream.until(lambda: request.client_closed_at is not None, timeout=5)
    return {
        "close_ms": (request.client_closed_at - stopped_at) * 1000
        if request.client_closed_at else None,
        "end_ms": (end_at - stopped_at) * 1000 if end_at else None,
    }


def summary(name: str, values: list[float]) -> str:
    values = sorted(values)
    if not values:
        return f"{name}: no data"
    p95 = values[min(len(values) - 1, int(round(0.95 * (len(values) - 1))))]
    return (
        f"{name}: n={len(values)} min={values[0]:.1f} p50={statistics.median(values):.1f} "
        f"p95={p95:.1f} max={values[-1]:.1f} mean={statistics.fmean(values):.1f} ms"
    )


async def main_async(args, cookie: str) -> int:
    from chat.demo_model import UpstreamServer
    from tests.live import LiveServer

    upstream = UpstreamServer(tokens_per_second=args.tokens_per_second).start_in_thread()
    server = LiveServer(
        {
            "OPENAI_BASE_URL": upstream.base_url,
            "OPENAI_API_KEY": "bench-key-not-secret",
            "OPENAI_MAX_RETRIES": "0",
            "CHAT_MODEL": "bench-model",
            "LOG_LEVEL": "WARNING",
            "DEBUG": "1",
        },
        name="bench-stop",
    ).start()
    results = []
    try:
        for _ in range(args.runs):
            results.append(await one_run(server, upstream, cookie, args.mode, args.deltas))
    finally:
        server.stop()
        upstream.stop_thread()
    closes = [r["close_ms"] for r in results if r["close_ms"] is not None]
    ends = [r["end_ms"] for r in results if r["end_ms"] is not None]
    print(f"mode={args.mode} runs={args.runs} upstream={args.tokens_per_second} tokens/s")
    print(summary("stop -> upstream saw connection closed", closes))
    print(summary("stop -> generation.end received", ends))
    print("per run close ms:", " ".join(f"{v:.1f}" for v in closes))
    missing = args.runs - len(closes)
    if missing:
        print(f"{missing} runs: upstream never saw the connection closed")
    return 1 if missing else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--mode", choices=["stop", "disconnect", "second-tab"], default="stop")
    parser.add_argument("--deltas", type=int, default=5, help="deltas to wait for before stop")
    parser.add_argument("--tokens-per-second", type=float, default=25.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        setup_django(str(Path(tmp) / "bench.sqlite3"))
        return asyncio.run(main_async(args, make_session_cookie()))


if __name__ == "__main__":
    sys.exit(main())
