"""Nothing leaks on RedisPubSubChannelLayer: every channel a socket or a run subscribes
to in Redis is released however it ends, and a run stopped before it
started still ends as any run does (generation.end, usage record, channels released).

The live server always uses Redis here (``REDIS_URL``, default
``redis://127.0.0.1:6379/0``) with a channel prefix of its own, so the Redis pub/sub
channels counted are exactly this server's, whatever other servers share the Redis.
"""

import asyncio
import json
import os
import time
import uuid

import pytest
import redis
import websockets
from asgiref.sync import sync_to_async
from channels.layers import InMemoryChannelLayer

from chat import generation as gen
from chat.models import Message
from tests.conftest import session_cookie
from tests.eventually import eventually

pytestmark = pytest.mark.django_db(transaction=True)

REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
ANSWER = " ".join(f"word{i}" for i in range(200))


def pubsub_channels(prefix: str) -> list[str]:
    """Redis pub/sub channels with at least one subscriber whose name starts with
    ``prefix`` (``PUBSUB CHANNELS`` is server-wide: the prefix isolates this test)."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return sorted(name.decode() for name in client.pubsub_channels(f"{prefix}*"))
    finally:
        client.close()


async def until_count(prefix: str, expected: int, timeout: float = 15) -> list[str]:
    """Poll until ``expected`` channels of ``prefix`` are subscribed (or the timeout);
    returns the last list seen."""
    deadline = time.monotonic() + timeout
    while True:
        names = await sync_to_async(pubsub_channels)(prefix)
        if len(names) == expected or time.monotonic() > deadline:
            return names
        await asyncio.sleep(0.1)


async def test_sockets_that_disconnect_right_after_sending_a_message_leave_no_subscription(
    alice, upstream, asgi_servers
):
    upstream.answer = ANSWER
    prefix = f"{os.environ.get('CHANNEL_PREFIX', '')}leak{uuid.uuid4().hex[:8]}"
    # One user opens 30 sockets in bursts of 10: the per-user limits (tests/test_flood.py)
    # are off, or a burst may come before the last one's closes are counted.
    server = asgi_servers(REDIS_URL=REDIS_URL, CHANNEL_PREFIX=prefix, LOG_LEVEL="WARNING",
                          CHAT_MAX_SOCKETS_PER_USER="0", CHAT_FRAME_RATE="0")
    cookie = await sync_to_async(session_cookie)(alice)
    headers = {"Cookie": cookie, "Origin": server.url}

    async def open_tab(conversation):
        ws = await websockets.connect(
            f"{server.ws_url}/ws/conversations/{conversation}/", additional_headers=headers
        )
        assert json.loads(await ws.recv())["type"] == "state"
        return ws

    # The first socket starts the process's sweeper, whose stats listener stays
    # subscribed for the life of the process: that is the baseline.
    first = await open_tab(uuid.uuid4())
    await first.close()
    baseline = await until_count(prefix, 2)
    assert len(baseline) == 2, baseline

    async def send_and_leave():
        ws = await open_tab(uuid.uuid4())
        await ws.send(json.dumps({"type": "message", "content": "a long answer please"}))
        await ws.close()

    for _ in range(3):
        await asyncio.gather(*(send_and_leave() for _ in range(10)))

    left = await until_count(prefix, len(baseline))
    assert left == baseline, f"{len(left) - len(baseline)} subscriptions left behind: {left}"
    # And every run those sockets started did end. A run releases its control channel
    # before its end is saved, so the rows get a moment (the race failed CI once on
    # PostgreSQL). That a disconnect cancels the run is tested in the consumer's tests.
    async def none_streaming():
        return not await Message.objects.filter(status="streaming").aexists()

    assert await eventually(none_streaming, timeout=1.5)


# --- runs cancelled before they started ---------------------------------------------------
class SlowJoinLayer(InMemoryChannelLayer):
    """An in-memory layer whose group_add takes a while (a Redis round trip under load):
    the window in which a run is registered but not launched yet."""

    def __init__(self, delay, **kwargs):
        super().__init__(**kwargs)
        self.delay = delay
        self.joining = asyncio.Event()

    async def group_add(self, group, channel):
        if group.startswith("chatctl."):  # a run's control group
            self.joining.set()
            await asyncio.sleep(self.delay)
        await super().group_add(group, channel)


def control_members(layer, generation) -> dict:
    return layer.groups.get(gen.control_group_name(generation.conversation_id), {})


async def until_saved_as(message_id, status, timeout=10) -> Message:
    deadline = time.monotonic() + timeout
    while True:
        message = await Message.objects.select_related("usage").aget(id=message_id)
        if message.status == status or time.monotonic() > deadline:
            return message
        await asyncio.sleep(0.05)


async def test_a_stop_while_the_run_is_being_launched_is_not_lost(alice, upstream):
    upstream.answer = ANSWER
    layer = SlowJoinLayer(delay=0.3)
    conversation = uuid.uuid4()
    starting = asyncio.create_task(
        gen.start_generation(alice, conversation, "hi", layer=layer)
    )
    await asyncio.wait_for(layer.joining.wait(), 10)
    assert gen.running_generation(conversation) is not None
    assert await gen.request_stop(conversation, user_id=alice.id)
    generation = await starting
    end = await asyncio.wait_for(generation.wait(), 10)
    assert end["status"] == "cancelled"
    assert end["usage"] is not None
    assert control_members(layer, generation) == {}


async def test_a_run_whose_caller_is_cancelled_while_launching_still_ends_and_lets_go(
    alice, upstream
):
    # A socket torn down while its message was starting a run.
    upstream.answer = ANSWER
    layer = SlowJoinLayer(delay=0.3)
    conversation = uuid.uuid4()
    starting = asyncio.create_task(
        gen.start_generation(alice, conversation, "hi", layer=layer)
    )
    await asyncio.wait_for(layer.joining.wait(), 10)
    generation = gen.running_generation(conversation)
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    saved = await until_saved_as(generation.message_id, "cancelled")
    assert saved.status == "cancelled" and saved.usage is not None
    await asyncio.wait_for(generation.wait(), 10)
    assert gen.running_generation(conversation) is None
    assert control_members(layer, generation) == {}
    assert not [t for t in asyncio.all_tasks() if t.get_name() == f"generation-{saved.id}"]


async def test_a_run_cancelled_at_once_ends_with_its_usage_and_lets_go(alice, upstream):
    upstream.answer = ANSWER
    layer = InMemoryChannelLayer()
    generation = await gen.start_generation(alice, uuid.uuid4(), "hi", layer=layer)
    assert generation.cancel("disconnect")
    end = await asyncio.wait_for(generation.wait(), 10)
    assert end["status"] == "cancelled" and end["usage"] is not None
    assert control_members(layer, generation) == {}
