"""Admission control: a worker past its limit refuses NEW generations with an
``overloaded`` error frame (and HTTP 503 + Retry-After on the API) while the answers it
already streams keep streaming and complete; nothing is saved for a refused message;
it admits again once the load has dropped.

Real parts only: the loopback upstream, the ASGI application in-process for the
sockets, a live daphne process for the REST API.
"""

import asyncio
import time
import uuid

import aiohttp
import pytest
from asgiref.sync import sync_to_async

from chat.models import ApiToken, Conversation, Message
from tests.eventually import eventually

pytestmark = pytest.mark.django_db(transaction=True)

ANSWER = " ".join(f"word{i}" for i in range(40))


@pytest.fixture
def carol(django_user_model):
    return django_user_model.objects.create_user("carol", password="carol-password-1")


async def open_socket(connect, user, conversation_id=None):
    connected, _, ws = await connect(user, conversation_id or uuid.uuid4())
    assert connected
    await ws.receive_type("state")
    return ws


async def first_answer(ws, content):
    """Send a message; the socket's ``generation.start`` or ``error`` for it."""
    await ws.send({"type": "message", "content": content})
    return await ws.receive_until(lambda f: f["type"] in ("generation.start", "error"))


async def running_completes_then_refused_is_admitted(first, start, second):
    """The answer running on ``first`` ends completed with all its text; then the tab
    ``second``, refused before, is admitted (within 10 s) and its answer completes."""
    end = await first.receive_type("generation.end", timeout=20)
    assert end["status"] == "completed" and first.text(start["message"]["id"]) == ANSWER

    async def admitted():
        answer = await first_answer(second, "And me")
        return answer if answer["type"] == "generation.start" else None

    # Once a second: a client comes back after the retry hint, not in a tight loop
    # (which the frame rate limit would drop: tests/test_flood.py).
    assert await eventually(admitted, timeout=10, interval=1.0)
    assert (await second.receive_type("generation.end", timeout=20))["status"] == "completed"


async def test_a_worker_at_its_stream_limit_refuses_with_overloaded_while_running_answers_complete(
    alice, bob, carol, upstream, connect, settings
):
    settings.CHAT_MAX_STREAMS_PER_WORKER = 2
    upstream.answer = ANSWER
    upstream.tokens_per_second = 40  # about 1 s per answer
    running = [await open_socket(connect, user) for user in (alice, bob)]
    starts = [await first_answer(ws, "Count slowly") for ws in running]
    assert [s["type"] for s in starts] == ["generation.start"] * 2
    # generation.start goes out before the provider request is on the wire.
    assert await upstream.until(lambda: len(upstream.requests) == 2, 5)

    conversation_id = uuid.uuid4()
    refused_ws = await open_socket(connect, carol, conversation_id)
    refused = await first_answer(refused_ws, "Me too, please")
    assert refused["type"] == "error" and refused["code"] == "overloaded"
    assert refused["reason"] == "streams"
    assert 2000 <= refused["retry_after_ms"] <= 3000
    # Nothing saved for the refused message: no conversation, no user row.
    assert not await Message.objects.filter(conversation_id=conversation_id).aexists()
    assert not await Conversation.objects.filter(id=conversation_id).aexists()
    assert len(upstream.requests) == 2, "the refused message reached the provider"

    for ws, start in zip(running, starts, strict=True):
        end = await ws.receive_type("generation.end", timeout=20)
        assert end["status"] == "completed"
        assert ws.text(start["message"]["id"]) == ANSWER

    # The load dropped: the same socket may send its message again.
    admitted = await first_answer(refused_ws, "Me too, please")
    assert admitted["type"] == "generation.start"
    assert (await refused_ws.receive_type("generation.end", timeout=20))["status"] == "completed"


async def test_starts_waiting_for_their_transaction_past_the_limit_are_refused(
    alice, bob, carol, upstream, connect, settings
):
    settings.CHAT_TUNING = settings.CHAT_TUNING.replace(max_pending_starts=1)
    upstream.answer = ANSWER
    upstream.tokens_per_second = 200
    sockets = [await open_socket(connect, user) for user in (alice, bob, carol)]
    # All three at once: the first one's transaction (in a thread) is still running
    # when the others are checked.
    await asyncio.gather(*(ws.send({"type": "message", "content": f"Question {n}"})
                           for n, ws in enumerate(sockets)))
    answers = await asyncio.gather(*(
        ws.receive_until(lambda f: f["type"] in ("generation.start", "error"))
        for ws in sockets))
    refused = [a for a in answers if a["type"] == "error"]
    assert any(a["type"] == "generation.start" for a in answers)
    assert refused and all(a["code"] == "overloaded" and a["reason"] == "starts"
                           for a in refused)
    for ws, answer in zip(sockets, answers, strict=True):
        if answer["type"] == "generation.start":
            assert (await ws.receive_type("generation.end", timeout=20))["status"] == "completed"


async def test_a_start_that_would_wait_longer_than_the_limit_for_its_transaction_is_refused(
    alice, bob, upstream, connect, settings
):
    settings.CHAT_TUNING = settings.CHAT_TUNING.replace(max_start_wait_ms=300,
                                                        max_pending_starts=0)
    upstream.answer = ANSWER
    upstream.tokens_per_second = 200
    first, second = [await open_socket(connect, user) for user in (alice, bob)]
    # Every thread of the executor the start transactions run in is taken for 1 s, as
    # by a database that answers slowly: a start admitted now waits there.
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, lambda: None)
    threads = loop._default_executor._max_workers
    held = [loop.run_in_executor(None, time.sleep, 1.0) for _ in range(threads)]
    await first.send({"type": "message", "content": "Question 1"})
    await asyncio.sleep(0.5)
    refused = await first_answer(second, "Question 2")
    assert refused["type"] == "error" and refused["code"] == "overloaded"
    assert refused["reason"] == "starts"
    await asyncio.gather(*held)
    assert (await first.receive_type("generation.end", timeout=20))["status"] == "completed"

    # The queue drained: the same message is admitted now.
    admitted = await first_answer(second, "Question 2")
    assert admitted["type"] == "generation.start"
    assert (await second.receive_type("generation.end", timeout=20))["status"] == "completed"


async def test_an_event_loop_that_runs_late_refuses_new_answers_then_admits_them_again(
    alice, bob, upstream, connect, settings
):
    settings.CHAT_TUNING = settings.CHAT_TUNING.replace(max_loop_lag_ms=100)
    upstream.answer = ANSWER
    upstream.tokens_per_second = 40
    first = await open_socket(connect, alice)
    start = await first_answer(first, "Count slowly")
    assert start["type"] == "generation.start"  # and the lag probe runs from now on

    second = await open_socket(connect, bob)
    # Hold the loop as an overloaded worker does: the 100 ms probe fires 300 ms late,
    # again and again, for 2 s.
    for _ in range(5):
        time.sleep(0.4)  # noqa: ASYNC251 - blocking the loop is the point
        await asyncio.sleep(0)
    refused = await first_answer(second, "And me")
    assert refused["type"] == "error" and refused["code"] == "overloaded"
    assert refused["reason"] == "lag"

    # The running answer was only delayed, not lost; the smoothed lag falls under half
    # the limit within a few seconds of an idle loop, and the refused tab is admitted.
    await running_completes_then_refused_is_admitted(first, start, second)


def post(session, server, key, conversation_id, content, *, stream):
    headers = {"Authorization": f"Token {key}"}
    if stream:
        headers["Accept"] = "text/event-stream"
    return session.post(f"{server.url}/api/conversations/{conversation_id}/messages/",
                        json={"content": content}, headers=headers)


async def test_the_api_answers_503_with_retry_after_past_the_limit_and_201_once_load_dropped(
    alice, bob, upstream, asgi_servers
):
    server = asgi_servers(CHAT_MAX_STREAMS_PER_WORKER="1",
                          CHAT_TUNING='{"overload_retry_ms": 1500}')
    upstream.answer = ANSWER
    upstream.tokens_per_second = 40
    keys, conversations = [], []
    for user in (alice, bob):
        _, key = await sync_to_async(ApiToken.issue)(user, "overload")
        keys.append(key)
        conversations.append(await Conversation.objects.acreate(owner=user))

    async with aiohttp.ClientSession() as session:
        async with post(session, server, keys[0], conversations[0].id, "Count slowly",
                        stream=True) as running:
            assert running.status == 200
            await running.content.readuntil(b"event: generation.start")
            async with post(session, server, keys[1], conversations[1].id, "Me too",
                            stream=False) as refused:
                assert refused.status == 503
                assert refused.headers["Retry-After"] in {"2", "3"}  # 1.5-2.25 s, rounded up
                body = await refused.json()
                assert body["code"] == "overloaded" and 1500 <= body["retry_after_ms"] <= 2250
            assert not await Message.objects.filter(conversation=conversations[1]).aexists()
            rest = await running.content.read()
            assert b"event: generation.end" in rest and b'"status": "completed"' in rest

        async def admitted():
            async with post(session, server, keys[1], conversations[1].id, "Me too",
                            stream=False) as response:
                body = await response.json()
                return None if body.get("code") == "overloaded" else (response.status, body)

        # The first run's slot is freed once its end is published.
        status, message = await eventually(admitted, timeout=10, interval=0.2)
        assert status == 201 and message["status"] == "completed"
        assert message["content"] == ANSWER
