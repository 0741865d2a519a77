"""Local fan-out: the sockets of a conversation in one process
get its frames directly, and the channel layer carries them only to other processes,
once per process, never once per socket (chat.generation.fanout).

The promises stay: every tab in every process sees every frame once and in order, a
socket of another user gets nothing, a lost cross-process message is repaired.

Live servers and the Redis layers here always use Redis (``REDIS_URL``, default
``redis://127.0.0.1:6379/0``) with a channel prefix of their own.
"""

import asyncio
import json
import os
import uuid

import pytest
import websockets
from asgiref.sync import sync_to_async
from channels.layers import InMemoryChannelLayer, get_channel_layer
from channels_redis.pubsub import RedisPubSubChannelLayer

from chat.models import Message
from tests.conftest import session_cookie
from tests.test_multiprocess import LiveSocket
from tests.test_seq_gap_repair import text_as_a_client_shows_it

pytestmark = pytest.mark.django_db(transaction=True)

REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
ANSWER = " ".join(f"token{i}" for i in range(80))


def unique_prefix() -> str:
    return f"{os.environ.get('CHANNEL_PREFIX', '')}fan{uuid.uuid4().hex[:10]}"


class CountingInMemoryLayer(InMemoryChannelLayer):
    """The in-memory layer, counting the ``chat.frame`` messages sent to groups."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.frames_sent = 0

    async def group_send(self, group, message):
        if message.get("type") == "chat.frame":
            self.frames_sent += 1
        await super().group_send(group, message)


class CountingRedisLayer(RedisPubSubChannelLayer):
    """The Redis pub/sub layer, counting ``chat.frame`` messages sent to groups and
    received from them (by anything in this process)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.frames_sent = self.frames_received = 0

    async def group_send(self, group, message):
        if message.get("type") == "chat.frame":
            self.frames_sent += 1
        await self._get_layer().group_send(group, message)

    async def receive(self, channel):
        message = await self._get_layer().receive(channel)
        if message.get("type") == "chat.frame":
            self.frames_received += 1
        return message


class LossyRedisLayer(RedisPubSubChannelLayer):
    """The Redis pub/sub layer losing, once, the group message of the delta of seq 3 on
    its way in (as channels-redis does silently when a channel is over capacity)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.dropped: list[dict] = []

    async def receive(self, channel):
        while True:
            message = await self._get_layer().receive(channel)
            frame = message.get("frame") or {}
            if frame.get("type") == "delta" and frame["seq"] == 3 and not self.dropped:
                self.dropped.append(frame)
                continue
            return message


def use_layer(settings, backend: type, **config) -> None:
    """This test process's channel layer (a fresh instance: conftest clears them)."""
    settings.CHANNEL_LAYERS = {"default": {
        "BACKEND": f"{backend.__module__}.{backend.__qualname__}", "CONFIG": config,
    }}


def frames_seen_once_in_order(frames: list[dict], message_id: str) -> str:
    """Check one tab's frames of a run it watched from before its start: one
    ``message``, one ``generation.start``, deltas 1, 2, 3, ... and one
    ``generation.end``, in that order. Returns the text of the deltas."""
    kinds = [f["type"] for f in frames if f["type"] != "state"]
    assert kinds[:2] == ["message", "generation.start"], kinds
    assert kinds[-1] == "generation.end" and kinds.count("generation.end") == 1, kinds
    assert set(kinds[2:-1]) == {"delta"}, kinds
    deltas = [f for f in frames if f["type"] == "delta"]
    assert {d["message_id"] for d in deltas} == {message_id}
    assert [d["seq"] for d in deltas] == list(range(1, len(deltas) + 1))
    return "".join(d["content"] for d in deltas)


async def two_tabs_see_one_answer(alice, upstream, connect) -> list:
    """Two of alice's tabs on one new conversation of this process; the first asks, and
    both see every frame of the answer once and in order. Returns the two tabs."""
    upstream.answer = ANSWER
    conversation = uuid.uuid4()
    tabs = [(await connect(alice, conversation))[2] for _ in range(2)]
    for tab in tabs:
        await tab.receive_type("state")
    await tabs[0].send({"type": "message", "content": "count for me"})
    for tab in tabs:
        await tab.receive_type("generation.end", timeout=20)
    message_id = tabs[0].deltas()[0]["message_id"]
    for tab in tabs:
        assert frames_seen_once_in_order(tab.frames, message_id) == ANSWER
    return tabs


# --- the in-memory layer: one process, no layer for frames --------------------------------
async def test_with_the_in_memory_layer_two_tabs_get_every_frame_without_the_channel_layer(
    alice, upstream, connect, settings
):
    use_layer(settings, CountingInMemoryLayer)
    await two_tabs_see_one_answer(alice, upstream, connect)

    assert get_channel_layer().frames_sent == 0, "frames went through the in-memory layer"


# --- Redis: once per process ----------------------------------------------------------------
async def test_two_tabs_of_one_process_take_one_layer_message_per_frame_not_one_each(
    alice, upstream, connect, settings
):
    use_layer(settings, CountingRedisLayer, hosts=[REDIS_URL], prefix=unique_prefix())
    tabs = await two_tabs_see_one_answer(alice, upstream, connect)

    layer = get_channel_layer()
    published = len(tabs[0].frames) - 1  # all but the state frame
    # Sent once for other processes; this process's relay gets it back once and
    # ignores it (its origin): before, each of the two tabs received every frame.
    assert layer.frames_sent == published
    assert layer.frames_received <= published
    for tab in tabs:
        await tab.close()
    await layer.flush()


# --- live processes ---------------------------------------------------------------------------
async def open_tab(server, user, conversation) -> tuple[LiveSocket, dict]:
    """A tab of ``user`` on a live server; returns it and its first frame."""
    cookie = await sync_to_async(session_cookie)(user)
    ws = await websockets.connect(
        f"{server.ws_url}/ws/conversations/{conversation}/",
        additional_headers={"Cookie": cookie, "Origin": server.url},
    )
    tab = LiveSocket(ws)
    first = await tab.receive_until(lambda f: True)
    return tab, first


@pytest.mark.multiprocess
async def test_two_tabs_here_and_one_on_another_worker_see_every_frame_once_in_order_and_bob_none(
    alice, bob, upstream, asgi_servers
):
    upstream.answer = ANSWER
    env = {"REDIS_URL": REDIS_URL, "CHANNEL_PREFIX": unique_prefix(), "LOG_LEVEL": "WARNING"}
    a, b = asgi_servers(name="a", **env), asgi_servers(name="b", **env)
    conversation = uuid.uuid4()
    # Bob's tab joins the id first, on the process that will run the generation.
    bobs, bob_state = await open_tab(a, bob, conversation)
    assert bob_state["type"] == "state" and bob_state["conversation"] is None
    here1, _ = await open_tab(a, alice, conversation)
    here2, _ = await open_tab(a, alice, conversation)
    there, _ = await open_tab(b, alice, conversation)

    await here1.send({"type": "message", "content": "count for me"})
    ends = await asyncio.gather(
        *(tab.receive_type("generation.end", timeout=30) for tab in (here1, here2, there))
    )
    assert {end["status"] for end in ends} == {"completed"}
    message_id = ends[0]["message_id"]
    for tab in (here1, here2, there):
        assert frames_seen_once_in_order(tab.frames, message_id) == ANSWER

    # Bob's tab was told the conversation is someone else's and closed, nothing else.
    with pytest.raises(websockets.ConnectionClosed) as closed:
        while True:
            bobs.frames.append(json.loads(await asyncio.wait_for(bobs.ws.recv(), 10)))
    assert closed.value.rcvd.code == 4403
    assert [f["type"] for f in bobs.frames] == ["state", "error"]
    assert bobs.frames[1]["code"] == "forbidden"
    for tab in (here1, here2, there):
        await tab.ws.close()


@pytest.mark.multiprocess
async def test_a_lost_relay_message_is_repaired_with_a_fresh_state(
    alice, upstream, asgi_servers, connect, settings
):
    # The run streams in a live worker; this test process is the other process, whose
    # relay loses the group message of delta 3 on its way in.
    upstream.answer = ANSWER
    prefix = unique_prefix()
    use_layer(settings, LossyRedisLayer, hosts=[REDIS_URL], prefix=prefix)
    worker = asgi_servers(name="a", REDIS_URL=REDIS_URL, CHANNEL_PREFIX=prefix,
                          LOG_LEVEL="WARNING")
    conversation = uuid.uuid4()
    _, _, here = await connect(alice, conversation)
    await here.receive_type("state")
    there, _ = await open_tab(worker, alice, conversation)
    await there.send({"type": "message", "content": "count for me"})

    end = await here.receive_type("generation.end", timeout=30)
    assert end["status"] == "completed"
    message_id = end["message_id"]
    layer = get_channel_layer()
    assert [f["seq"] for f in layer.dropped] == [3]
    states = [i for i, f in enumerate(here.frames) if f["type"] == "state"]
    assert len(states) == 2, "the gap must trigger exactly one fresh state frame"
    before = [f["seq"] for f in here.frames[: states[1]] if f["type"] == "delta"]
    assert before == [1, 2], "no delta after the gap may reach the tab before the repair"
    repair = here.frames[states[1]]["generation"]
    assert repair["message_id"] == message_id and repair["seq"] >= 3
    after = [f["seq"] for f in here.frames[states[1]:] if f["type"] == "delta"]
    assert after == list(range(repair["seq"] + 1, repair["seq"] + 1 + len(after)))
    assert text_as_a_client_shows_it(here.frames, message_id) == ANSWER
    assert (await Message.objects.aget(id=message_id)).content == ANSWER
    await there.ws.close()
    await here.close()
    await layer.flush()
