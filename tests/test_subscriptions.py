"""Nothing leaks on RedisPubSubChannelLayer: every channel a socket or a run subscribes
to in Redis is released however it ends (issue 9, item 5).

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

from chat.models import Message
from tests.conftest import session_cookie

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
    server = asgi_servers(REDIS_URL=REDIS_URL, CHANNEL_PREFIX=prefix, LOG_LEVEL="WARNING")
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
    # And every run those sockets started did end (cancelled by the disconnect).
    assert not await Message.objects.filter(status="streaming").aexists()
