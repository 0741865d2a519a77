"""A consumer's dispatch loop (chat.dispatching): every message of the client, the
fan-out inbox and the layer channel reaches the consumer, in order per source, under
this project's server's queue (one loop pass per message) and under any other ASGI
server."""

import asyncio

import pytest
from channels.exceptions import StopConsumer

from chat.dispatching import dispatch_one_pass
from chat.generation.fanout import Batch, Inbox
from tests.conftest import server_queue


async def _dispatch_until(receive, inbox, channel_receive, feed, count):
    """Run the loop while ``feed()`` sends messages; the ``count`` dispatched ones."""
    got = []

    async def dispatch(message):
        got.append(message)
        if len(got) == count:
            raise StopConsumer

    feeder = asyncio.create_task(feed())
    with pytest.raises(StopConsumer):
        await asyncio.wait_for(dispatch_one_pass(receive, channel_receive, inbox, dispatch), 5)
    await feeder
    return got


@pytest.mark.parametrize("server", ["this project's server", "another server"])
async def test_every_message_of_every_source_is_dispatched_in_order(server):
    queue = server_queue() if server == "this project's server" else asyncio.Queue()
    receive = queue.get
    inbox = Inbox(limit=100)
    replies = asyncio.Queue()

    async def feed():
        for i in range(5):
            await queue.put({"type": "websocket.receive", "text": f"client {i}"})
            inbox.push({"type": "delta", "seq": i})
            await asyncio.sleep(0.01)
        await replies.put({"type": "generation.snapshot"})

    got = await _dispatch_until(receive, inbox, replies.get, feed, 11)
    client = [m["text"] for m in got if isinstance(m, dict) and m["type"] == "websocket.receive"]
    frames = [f["seq"] for m in got if isinstance(m, Batch) for f in m.frames]
    assert client == [f"client {i}" for i in range(5)]
    assert frames == list(range(5))
    assert {"type": "generation.snapshot"} in got


async def test_a_client_message_is_handled_one_loop_pass_after_it_arrives():
    queue = server_queue()
    inbox = Inbox(limit=100)
    handled = asyncio.Event()

    async def dispatch(message):
        handled.set()
        raise StopConsumer

    loop = asyncio.create_task(
        dispatch_one_pass(queue.get, asyncio.Event().wait, inbox, dispatch))
    await asyncio.sleep(0.05)  # the loop waits
    queue.put_nowait({"type": "websocket.receive", "text": "stop"})  # as daphne puts it
    await asyncio.sleep(0)  # one pass
    assert handled.is_set()
    with pytest.raises(StopConsumer):
        await loop
