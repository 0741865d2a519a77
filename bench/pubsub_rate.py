"""How many group messages per second one process publishes through the Redis pub/sub
channel layer while its event loop is busy, stock channels-redis vs
``chat.channels_redis_adapter`` (why PostgreSQL + Redis collapsed; docs/scale.md).

    python -m bench.pubsub_rate --redis redis://127.0.0.1:6379/14 --prefix ovl

``--publishers`` tasks (400: one per running answer) each send one group message after
the other (as a run's publisher does); ``--busy-ms`` of CPU per ``--busy-tasks``
callbacks per loop pass stand for the rest of the worker's work (reading upstream
streams). Prints messages/s per layer and busy level. Nothing subscribes: the figure is
the publishing side only.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from channels_redis.pubsub import RedisPubSubChannelLayer

from chat.channels_redis_adapter import BatchingPubSubChannelLayer


async def _busy(stop: asyncio.Event, busy_s: float) -> None:
    while not stop.is_set():
        end = time.perf_counter() + busy_s
        while time.perf_counter() < end:
            pass
        await asyncio.sleep(0)


async def measure(layer_cls, redis: str, prefix: str, publishers: int, busy_tasks: int,
                  busy_ms: float, seconds: float) -> float:
    """Messages/s published by ``publishers`` tasks over ``seconds``."""
    layer = layer_cls(hosts=[{"address": redis}], prefix=prefix)
    stop = asyncio.Event()
    sent = 0

    async def publisher(n: int) -> None:
        nonlocal sent
        while not stop.is_set():
            await layer.group_send(f"rate{n}", {"type": "chat.frame", "frame": {"n": n}})
            sent += 1

    await layer.group_send("warm", {"type": "x"})
    busy = [asyncio.create_task(_busy(stop, busy_ms / 1000)) for _ in range(busy_tasks)]
    tasks = [asyncio.create_task(publisher(n)) for n in range(publishers)]
    started = time.perf_counter()
    await asyncio.sleep(seconds)
    stop.set()
    count, elapsed = sent, time.perf_counter() - started
    await asyncio.gather(*tasks, *busy, return_exceptions=True)
    await layer.flush()
    return count / elapsed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--prefix", default="ovlrate")
    parser.add_argument("--publishers", type=int, default=400)
    parser.add_argument("--busy-tasks", type=int, default=10)
    parser.add_argument("--busy-ms", default="0,1,5", help="CPU per busy callback (ms), list")
    parser.add_argument("--seconds", type=float, default=3)
    args = parser.parse_args(argv)
    print("| layer | loop pass (busy ms x tasks) | messages/s |")
    print("|---|---:|---:|")
    for busy_ms in (float(x) for x in args.busy_ms.split(",")):
        for name, cls in (("channels-redis RedisPubSubChannelLayer", RedisPubSubChannelLayer),
                          ("chat.channels_redis_adapter BatchingPubSubChannelLayer",
                           BatchingPubSubChannelLayer)):
            rate = asyncio.run(measure(cls, args.redis, args.prefix, args.publishers,
                                       args.busy_tasks, busy_ms, args.seconds))
            print(f"| {name} | {busy_ms:g} x {args.busy_tasks} | {rate:,.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
