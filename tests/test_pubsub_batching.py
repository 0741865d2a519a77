"""chat.channels_redis_adapter.BatchingPubSubChannelLayer (the default pub/sub layer): many tasks
publishing at once while the event loop is busy still get every message through, each
sender's messages in order (2000 messages within 10 s: the stock layer, one locked round
trip per message, gets a few dozen through per second on such a loop, the collapse of
PostgreSQL + Redis at K = 400 in docs/scale.md; figures in bench.pubsub_rate); and a
publish that cannot reach Redis raises to its caller.

Real Redis (``REDIS_URL``, default ``redis://127.0.0.1:6379/0``) under a prefix of its
own.
"""

import asyncio
import os
import time
import uuid

import pytest

from chat.channels_redis_adapter import BatchingPubSubChannelLayer

REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
SENDERS, PER_SENDER = 50, 40


async def busy_loop(stop: asyncio.Event) -> None:
    """Callbacks of 2 ms of CPU each, as a worker reading many upstream streams."""
    while not stop.is_set():
        until = time.perf_counter() + 0.002
        while time.perf_counter() < until:
            pass
        await asyncio.sleep(0)


async def publish_all(layer_cls, seconds: float) -> tuple[dict[int, list[int]], int]:
    """SENDERS tasks each sending PER_SENDER messages to one group, for at most
    ``seconds`` beside a busy loop; returns what the group's member received per
    sender, and how many were sent."""
    layer = layer_cls(hosts=[{"address": REDIS_URL}], prefix=f"t{uuid.uuid4().hex[:8]}")
    channel = await layer.new_channel()
    await layer.group_add("g", channel)
    received: dict[int, list[int]] = {}
    sent = 0

    async def sender(n: int) -> None:
        nonlocal sent
        for i in range(PER_SENDER):
            await layer.group_send("g", {"type": "m", "n": n, "i": i})
            sent += 1

    async def receiver() -> None:
        while True:
            message = await layer.receive(channel)
            received.setdefault(message["n"], []).append(message["i"])

    stop = asyncio.Event()
    busy = [asyncio.create_task(busy_loop(stop)) for _ in range(5)]
    reading = asyncio.create_task(receiver())
    try:
        await asyncio.wait_for(asyncio.gather(*(sender(n) for n in range(SENDERS))), seconds)
    except TimeoutError:
        pass
    total = SENDERS * PER_SENDER
    deadline = time.monotonic() + 5
    while sum(map(len, received.values())) < sent and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    stop.set()
    reading.cancel()
    await asyncio.gather(reading, *busy, return_exceptions=True)
    await layer.flush()
    assert sent <= total
    return received, sent


async def test_many_senders_on_a_busy_loop_get_every_message_through_in_order():
    received, sent = await publish_all(BatchingPubSubChannelLayer, seconds=10)
    assert sent == SENDERS * PER_SENDER
    assert received == {n: list(range(PER_SENDER)) for n in range(SENDERS)}


async def test_a_publish_that_cannot_reach_redis_raises_to_its_caller():
    layer = BatchingPubSubChannelLayer(hosts=[{"address": "redis://127.0.0.1:1/0"}])
    with pytest.raises(Exception) as caught:  # noqa: PT011 - redis-py's connection error
        await layer.group_send("g", {"type": "m"})
    assert "connect" in str(caught.value).lower() or "refused" in str(caught.value).lower()
    await layer.flush()


async def test_many_sockets_joining_at_once_on_a_busy_loop_are_all_subscribed_within_seconds():
    # A ramp of new sockets: each subscribes its channel and its conversation's group.
    # The stock layer takes the shard's lock per subscribe, a loop pass per hand-off:
    # 600 of them on this loop take longer than the deadline below.
    layer = BatchingPubSubChannelLayer(hosts=[{"address": REDIS_URL}],
                                       prefix=f"t{uuid.uuid4().hex[:8]}")
    stop = asyncio.Event()
    busy = [asyncio.create_task(busy_loop(stop)) for _ in range(5)]

    async def join(n: int) -> str:
        channel = await layer.new_channel()
        await layer.group_add(f"g{n}", channel)
        return channel

    try:
        started = time.monotonic()
        channels = await asyncio.wait_for(asyncio.gather(*(join(n) for n in range(300))), 20)
        joined_s = time.monotonic() - started
    finally:
        stop.set()
        await asyncio.gather(*busy)
    try:
        assert joined_s < 4.0, f"300 sockets took {joined_s:.1f} s to subscribe"
        # And every one of them is really subscribed: its group's message reaches it.
        for n in (0, 150, 299):
            await layer.group_send(f"g{n}", {"type": "m", "n": n})
            message = await asyncio.wait_for(layer.receive(channels[n]), 5)
            assert message["n"] == n
    finally:
        await layer.flush()


async def test_subscribes_and_unsubscribes_made_together_take_effect_in_their_order():
    layer = BatchingPubSubChannelLayer(hosts=[{"address": REDIS_URL}],
                                       prefix=f"t{uuid.uuid4().hex[:8]}")
    shard = layer._get_layer()._shards[0]
    x, y = f"x-{uuid.uuid4().hex}", f"y-{uuid.uuid4().hex}"
    try:
        await asyncio.gather(shard.subscribe(x), shard.subscribe(y), shard.unsubscribe(x),
                             shard.subscribe(y))
        shard._ensure_redis()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            counts = dict(await shard._redis.pubsub_numsub(x, y))
            if counts == {x.encode(): 0, y.encode(): 1}:
                break
            await asyncio.sleep(0.05)
        assert counts == {x.encode(): 0, y.encode(): 1}
    finally:
        await layer.flush()
