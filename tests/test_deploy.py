"""A rolling deploy loses nothing: worker A is told to stop (SIGTERM) while answers
stream on it, its tabs get close code 1012 and reconnect to worker B (what a load
balancer does), and follow the answers there to their end. Two live daphne processes
on the test database and one Redis, as in tests/test_multiprocess.py.
"""

import json
import signal
import time
import uuid

import pytest
import websockets
from asgiref.sync import sync_to_async

from chat.models import Message, UsageRecord
from tests.conftest import session_cookie
from tests.test_multiprocess import REDIS_URL, LiveSocket

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.multiprocess]

N = 4
# About 3 s at 20 words a second: the answers are still streaming when A is told to stop.
ANSWER = " ".join(f"word{i}" for i in range(60))


@pytest.fixture
def workers(asgi_servers):
    """``workers(grace_s)``: processes A and B on one Redis (a prefix of their own) and
    the test database, with ``CHAT_SHUTDOWN_GRACE_S`` = ``grace_s``."""

    def start(grace_s: float = 30):
        env = {"REDIS_URL": REDIS_URL, "CHANNEL_PREFIX": f"dp{uuid.uuid4().hex[:10]}",
               "LOG_LEVEL": "WARNING", "CHAT_TUNING": json.dumps({"checkpoint_ms": 200}),
               "CHAT_SHUTDOWN_GRACE_S": str(grace_s)}
        return asgi_servers(name="a", **env), asgi_servers(name="b", **env)

    return start


class Tab:
    """A browser tab: an id of its own kept across its sockets (the ``tab`` query
    parameter) and the frames of each of its sockets."""

    def __init__(self, cookie: str, conversation_id):
        self.id = uuid.uuid4().hex
        self.cookie = cookie
        self.conversation_id = conversation_id
        self.sockets: list[LiveSocket] = []

    @property
    def socket(self) -> LiveSocket:
        return self.sockets[-1]

    async def open(self, server) -> LiveSocket:
        ws = await websockets.connect(
            f"{server.ws_url}/ws/conversations/{self.conversation_id}/?tab={self.id}",
            additional_headers={"Cookie": self.cookie, "Origin": server.url},
        )
        self.sockets.append(LiveSocket(ws))
        await self.socket.receive_type("state")
        return self.socket

    async def close_code(self, timeout: float = 10) -> int:
        """Read the current socket until the server closes it; its close code."""
        try:
            await self.socket.receive_until(lambda f: False, timeout)
        except websockets.ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd else 1006
        raise AssertionError("not closed")


def users_cookies(django_user_model, count: int) -> list[str]:
    """Session cookies of ``count`` users (alice0, alice1, ...): one answer each, as the
    per-user concurrency limit allows."""
    return [session_cookie(django_user_model.objects.create_user(f"alice{i}", password="pw-1x"))
            for i in range(count)]


async def tabs_streaming_on(server, django_user_model, count: int) -> list[Tab]:
    """``count`` tabs on ``server``, each of its own user, each with an answer streaming."""
    cookies = await sync_to_async(users_cookies)(django_user_model, count)
    tabs = [Tab(cookie, uuid.uuid4()) for cookie in cookies]
    for tab in tabs:
        await tab.open(server)
        await tab.socket.send({"type": "message", "content": "count for me"})
    for tab in tabs:
        tab.message_id = (await tab.socket.receive_type("generation.start"))["message"]["id"]
        await tab.socket.receive_until(lambda f: f["type"] == "delta" and f["seq"] >= 3)
    return tabs


def seen_text(tab: Tab) -> tuple[str, list[int]]:
    """What the tab showed of its answer over all its sockets, rebuilt as the page does
    (a state frame replaces the text; deltas append), and the seqs in the order
    received: ints for deltas, ``("state", seq)`` for a state frame's snapshot."""
    text, seqs = "", []
    for sock in tab.sockets:
        for frame in sock.frames:
            if frame["type"] == "state" and frame.get("generation") and \
                    frame["generation"]["message_id"] == tab.message_id:
                text = frame["generation"]["content"]
                seqs.append(("state", frame["generation"]["seq"]))
            elif frame["type"] == "delta" and frame["message_id"] == tab.message_id:
                text += frame["content"]
                seqs.append(frame["seq"])
    return text, seqs


def exited_within(server, seconds: float) -> float:
    """Wait for the server process to exit; how long it took (s). Fails past ``seconds``."""
    began = time.monotonic()
    server.process.wait(seconds)
    return time.monotonic() - began


async def test_answers_streaming_on_a_stopped_worker_complete_in_full_in_tabs_moved_to_another(
    django_user_model, upstream, workers
):
    upstream.answer = ANSWER
    upstream.tokens_per_second = 20
    a, b = workers()
    tabs = await tabs_streaming_on(a, django_user_model, N)

    a.process.send_signal(signal.SIGTERM)
    codes = [await tab.close_code() for tab in tabs]
    assert codes == [1012] * N, "the worker closes its sockets with 'service restart'"
    for tab in tabs:
        await tab.open(b)
    ends = [await tab.socket.receive_type("generation.end", timeout=30) for tab in tabs]
    last_end = time.monotonic()
    assert [end["status"] for end in ends] == ["completed"] * N

    for tab in tabs:
        text, seqs = seen_text(tab)
        assert text == ANSWER
        deltas = [s for s in seqs if isinstance(s, int)]
        snapshot = [s for s in seqs if isinstance(s, tuple)][-1][1]
        before, after = [s for s in deltas if s <= snapshot], [s for s in deltas if s > snapshot]
        # Once each and in order: the first socket's deltas, the state of the second
        # (the run's snapshot from A), then the deltas after it.
        assert before == list(range(1, len(before) + 1))
        assert after == list(range(snapshot + 1, snapshot + 1 + len(after)))
        saved = await Message.objects.aget(id=tab.message_id)
        assert saved.status == "completed" and saved.content == ANSWER
    records = [r async for r in UsageRecord.objects.filter(
        message_id__in=[t.message_id for t in tabs])]
    assert len(records) == N and {r.status for r in records} == {"completed"}
    # A leaves once its last answer ended (its drain polls every 0.1 s, then exits).
    exited_within(a, 10)
    assert time.monotonic() - last_end < 3
    assert a.process.returncode == 0
    assert "drained" in a.log()
    for tab in tabs:
        await tab.socket.ws.close()


async def test_answers_longer_than_the_grace_end_interrupted_with_usage_and_upstream_closed(
    django_user_model, upstream, workers
):
    upstream.answer = " ".join(f"word{i}" for i in range(400))
    upstream.tokens_per_second = 20
    a, b = workers(grace_s=1)
    tabs = await tabs_streaming_on(a, django_user_model, N)

    signalled = time.monotonic()
    a.process.send_signal(signal.SIGTERM)
    for tab in tabs:
        assert await tab.close_code() == 1012
        await tab.open(b)
    ends = [await tab.socket.receive_type("generation.end", timeout=20) for tab in tabs]
    assert [end["status"] for end in ends] == ["interrupted"] * N
    assert all(end["usage"]["completion_tokens"] > 0 for end in ends)
    exited_within(a, 10)
    took = time.monotonic() - signalled
    assert took < 1 + 2, f"A exited {took:.1f} s after the signal (grace 1 s)"

    for request in upstream.requests[-N:]:
        assert request.client_closed_at is not None, "the upstream stream was closed"
    for tab in tabs:
        saved = await Message.objects.aget(id=tab.message_id)
        assert saved.status == "interrupted"
        assert saved.content and upstream.answer.startswith(saved.content)
        usage = await UsageRecord.objects.aget(message_id=tab.message_id)
        assert usage.status == "interrupted" and usage.completion_tokens > 0
    assert not await Message.objects.filter(status="streaming").aexists()
    for tab in tabs:
        await tab.socket.ws.close()


async def test_closing_the_tab_that_started_an_answer_stops_it_after_its_move_to_another_worker(
    django_user_model, upstream, workers
):
    upstream.answer = " ".join(f"word{i}" for i in range(400))
    upstream.tokens_per_second = 20
    a, b = workers()
    [tab] = await tabs_streaming_on(a, django_user_model, 1)
    watcher = Tab(tab.cookie, tab.conversation_id)
    await watcher.open(b)

    a.process.send_signal(signal.SIGTERM)
    assert await tab.close_code() == 1012
    await tab.open(b)
    # Still streaming on A after the 1012: the server's close stopped nothing.
    seq = tab.socket.frames[0]["generation"]["seq"]
    await tab.socket.receive_until(lambda f: f["type"] == "delta" and f["seq"] >= seq + 5)

    await tab.socket.ws.close()
    end = await watcher.socket.receive_type("generation.end", timeout=10)
    assert end["status"] == "cancelled"
    assert upstream.wait_for(lambda: upstream.requests[-1].client_closed_at is not None, 5)
    saved = await Message.objects.aget(id=tab.message_id)
    assert saved.status == "cancelled"
    exited_within(a, 10)
    await watcher.socket.ws.close()
