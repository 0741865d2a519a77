"""Two live daphne processes sharing one Redis channel layer and the test database:
what a user sees must not depend on which process a tab is connected to.

The servers always use Redis (``REDIS_URL``, default ``redis://127.0.0.1:6379/0``)
with a channel prefix of their own, whatever layer the test process uses.
"""

import asyncio
import json
import os
import time
import uuid

import pytest
import websockets
from asgiref.sync import sync_to_async

from chat.models import Message, UsageRecord
from tests.conftest import session_cookie
from tests.eventually import eventually

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.multiprocess]

REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
ANSWER = " ".join(f"token{i}" for i in range(120))


class LiveSocket:
    """A ``websockets`` client on a live server, with the frames it received."""

    def __init__(self, ws):
        self.ws = ws
        self.frames: list[dict] = []
        self.received_at: list[float] = []

    async def send(self, frame: dict) -> None:
        await self.ws.send(json.dumps(frame))

    async def receive_until(self, predicate, timeout: float = 20) -> dict:
        async with asyncio.timeout(timeout):
            while True:
                frame = json.loads(await self.ws.recv())
                self.frames.append(frame)
                self.received_at.append(time.monotonic())
                if predicate(frame):
                    return frame

    async def receive_type(self, kind: str, timeout: float = 20) -> dict:
        return await self.receive_until(lambda f: f["type"] == kind, timeout)

    def deltas(self, message_id) -> list[dict]:
        return [f for f in self.frames if f["type"] == "delta" and f["message_id"] == message_id]

    def text(self, message_id) -> str:
        return "".join(f["content"] for f in self.deltas(message_id))


@pytest.fixture
def two_servers(asgi_servers):
    """Processes A and B on one Redis (a prefix of their own) and the test database."""
    env = {
        "REDIS_URL": REDIS_URL,
        "CHANNEL_PREFIX": f"mp{uuid.uuid4().hex[:10]}",
        "LOG_LEVEL": "WARNING",
    }

    def start(**tuning):
        # chat.tuning constants of both processes: a checkpoint every 200 ms, and these.
        env["CHAT_TUNING"] = json.dumps({"checkpoint_ms": 200, **tuning})
        return asgi_servers(name="a", **env), asgi_servers(name="b", **env)

    return start


@pytest.fixture
def open_socket(alice):
    """``await open_socket(server, conversation_id)``: a tab of alice, past its state."""

    async def _open(server, conversation_id) -> LiveSocket:
        cookie = await sync_to_async(session_cookie)(alice)
        ws = await websockets.connect(
            f"{server.ws_url}/ws/conversations/{conversation_id}/",
            additional_headers={"Cookie": cookie, "Origin": server.url},
        )
        sock = LiveSocket(ws)
        await sock.receive_type("state")
        return sock

    return _open


async def start_run_watched_from_b(a, b, open_socket):
    """A tab on server A starts a run in a new conversation that a tab on server B
    watches; returns (tab on A, tab on B, assistant message id) once B saw it start."""
    conversation = uuid.uuid4()
    on_a = await open_socket(a, conversation)
    on_b = await open_socket(b, conversation)
    await on_a.send({"type": "message", "content": "count for me"})
    message_id = (await on_b.receive_type("generation.start"))["message"]["id"]
    return on_a, on_b, message_id


async def close_all(*sockets):
    for sock in sockets:
        await sock.ws.close()


async def test_deltas_of_a_run_in_one_process_reach_a_tab_on_the_other_complete_and_in_order(
    alice, upstream, two_servers, open_socket
):
    upstream.answer = ANSWER
    a, b = two_servers()
    on_a, on_b, message_id = await start_run_watched_from_b(a, b, open_socket)
    end_b = await on_b.receive_type("generation.end", timeout=30)
    end_a = await on_a.receive_type("generation.end", timeout=30)
    assert end_a["status"] == end_b["status"] == "completed"

    seqs = [f["seq"] for f in on_b.deltas(message_id)]
    assert seqs == list(range(1, len(seqs) + 1))
    assert on_b.text(message_id) == on_a.text(message_id) == ANSWER
    saved = await Message.objects.aget(id=message_id)
    assert saved.content == ANSWER and saved.status == "completed"
    await close_all(on_a, on_b)


async def test_a_stop_sent_to_the_other_process_stops_the_run_and_closes_its_upstream_stream(
    alice, upstream, two_servers, open_socket
):
    upstream.answer = ANSWER
    a, b = two_servers()
    on_a, on_b, message_id = await start_run_watched_from_b(a, b, open_socket)
    await on_b.receive_until(lambda f: f["type"] == "delta" and f["seq"] >= 5)
    request = upstream.requests[-1]

    stop_sent = time.monotonic()
    await on_b.send({"type": "stop"})
    end = await on_b.receive_type("generation.end")
    assert end["status"] == "cancelled"
    assert upstream.wait_for(lambda: request.client_closed_at is not None, 5)
    latency_ms = (request.client_closed_at - stop_sent) * 1000
    print(f"\ncross-process stop: upstream closed {latency_ms:.1f} ms after the stop frame")
    assert request.chunks_written < len(ANSWER.split())

    await on_a.receive_type("generation.end")
    saved = await Message.objects.aget(id=message_id)
    assert saved.status == "cancelled"
    assert saved.content == on_a.text(message_id) == on_b.text(message_id)
    usage = await UsageRecord.objects.aget(message_id=message_id)
    assert usage.status == "cancelled" and usage.completion_tokens > 0
    await close_all(on_a, on_b)


async def test_a_tab_joining_the_other_process_mid_stream_gets_text_so_far_then_each_delta_once(
    alice, upstream, two_servers, open_socket
):
    upstream.answer = ANSWER
    a, b = two_servers()
    conversation = uuid.uuid4()
    on_a = await open_socket(a, conversation)
    await on_a.send({"type": "message", "content": "count for me"})
    message_id = (await on_a.receive_type("generation.start"))["message"]["id"]
    await on_a.receive_until(lambda f: f["type"] == "delta" and f["seq"] >= 10)

    cookie = await sync_to_async(session_cookie)(alice)
    ws = await websockets.connect(
        f"{b.ws_url}/ws/conversations/{conversation}/",
        additional_headers={"Cookie": cookie, "Origin": b.url},
    )
    late = LiveSocket(ws)
    state = await late.receive_type("state")
    generation = state["generation"]
    assert generation["message_id"] == message_id
    assert generation["seq"] >= 10, "the snapshot comes from the running generation in A"
    assert generation["content"] and ANSWER.startswith(generation["content"])
    assert not ANSWER == generation["content"], "joined mid-stream"

    end = await late.receive_type("generation.end", timeout=30)
    assert end["status"] == "completed"
    seqs = [f["seq"] for f in late.deltas(message_id)]
    assert seqs == list(range(generation["seq"] + 1, generation["seq"] + 1 + len(seqs)))
    assert generation["content"] + late.text(message_id) == ANSWER
    await close_all(on_a, late)


async def test_a_killed_process_leaves_no_streaming_message_the_other_finishes_it_as_interrupted(
    alice, upstream, two_servers, open_socket
):
    upstream.answer = ANSWER
    upstream.tokens_per_second = 20
    a, b = two_servers(lease_s=2, sweep_s=1)
    on_a, on_b, message_id = await start_run_watched_from_b(a, b, open_socket)
    await on_b.receive_until(lambda f: f["type"] == "delta" and f["seq"] >= 10)
    async def checkpointed():  # at least one checkpoint (every 200 ms) saved some text
        return (await Message.objects.aget(id=message_id)).content

    await eventually(checkpointed)

    killed_at = time.monotonic()
    a.kill()
    end = await on_b.receive_type("generation.end", timeout=60)
    finished_s = time.monotonic() - killed_at
    print(f"\nkilled process: run finished as {end['status']} after {finished_s:.1f} s")
    assert end["message_id"] == message_id
    assert end["status"] == "interrupted"
    assert end["usage"]["estimated"] is True

    saved = await Message.objects.aget(id=message_id)
    assert saved.status == "interrupted"
    assert saved.content and ANSWER.startswith(saved.content)
    # The tab is brought to the saved (checkpointed) text, whatever deltas it had.
    state = await on_b.receive_type("state")
    shown = next(m for m in state["messages"] if m["id"] == message_id)
    assert shown["status"] == "interrupted" and shown["content"] == saved.content
    usage = await UsageRecord.objects.aget(message_id=message_id)
    assert usage.status == "interrupted" and usage.completion_tokens > 0
    assert not await Message.objects.filter(status="streaming").aexists()
    # The kernel closed the dead process's sockets, so upstream saw the client go.
    request = upstream.requests[-1]
    assert upstream.wait_for(lambda: not request.open, 5)
    await close_all(on_b)
