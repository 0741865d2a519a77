"""A run handed over: with the Responses API in background mode, a worker told to stop
(SIGTERM) whose grace ends mid-answer hands the answer to another worker instead of
interrupting it, and a worker that died (SIGKILL) has its answer picked up from its
last checkpoint once its lease expired. The other worker resumes the provider's stream
(GET ?stream=true&starting_after=N, no second POST) and the tab, reconnected to it,
sees the whole answer once. Two live daphne processes on PostgreSQL and one Redis,
the loopback upstream speaking the Responses API.
"""

import json
import signal
import time
import uuid

import pytest
from django.conf import settings

from chat.models import Message, UsageRecord
from tests.test_deploy import Tab, exited_within, seen_text, tabs_streaming_on
from tests.test_multiprocess import REDIS_URL
from tests.test_responses_provider import billed

pytestmark = [
    pytest.mark.django_db(transaction=True), pytest.mark.multiprocess,
    pytest.mark.skipif(not settings.DATABASES["default"]["ENGINE"].endswith("postgresql"),
                       reason="two workers sharing runs need PostgreSQL and Redis"),
]

# About 8 s at 20 words a second: far longer than the 1 s grace.
ANSWER = " ".join(f"word{i}" for i in range(160))


@pytest.fixture
def workers(asgi_servers, upstream):
    """``workers(background, **tuning)``: processes A and B on one Redis and the test
    database, speaking the Responses API (background mode or not) to the loopback
    upstream, with a 1 s shutdown grace."""
    upstream.dialect = "responses"
    upstream.answer = ANSWER
    upstream.tokens_per_second = 20

    def start(background: bool = True, **tuning):
        env = {"REDIS_URL": REDIS_URL, "CHANNEL_PREFIX": f"ho{uuid.uuid4().hex[:10]}",
               "LOG_LEVEL": "WARNING", "OPENAI_API": "responses",
               "OPENAI_BACKGROUND": "1" if background else "0",
               "CHAT_TUNING": json.dumps({"checkpoint_ms": 200, **tuning}),
               "CHAT_SHUTDOWN_GRACE_S": "1"}
        return asgi_servers(name="a", **env), asgi_servers(name="b", **env)

    return start


def assert_seen_once_in_order(tab: Tab) -> None:
    """The tab showed the whole answer, each delta once and in order: the deltas of its
    first socket from 1 on, and on the last one those after the snapshot of its last
    state frame, consecutive."""
    text, seqs = seen_text(tab)
    assert text == ANSWER
    first = [f["seq"] for f in tab.sockets[0].deltas(tab.message_id)]
    assert first == list(range(1, len(first) + 1))
    last_state = max(i for i, s in enumerate(seqs) if isinstance(s, tuple))
    snapshot = seqs[last_state][1]
    after = seqs[last_state + 1:]
    assert isinstance(snapshot, int) and after, "the tab followed the run on B"
    assert after == list(range(snapshot + 1, snapshot + 1 + len(after)))


async def assert_completed_once_with_the_billed_usage(tab: Tab, upstream) -> None:
    saved = await Message.objects.aget(id=tab.message_id)
    assert saved.status == "completed" and saved.content == ANSWER
    assert saved.handover is None
    records = [r async for r in UsageRecord.objects.filter(message_id=tab.message_id)]
    assert len(records) == 1
    assert records[0].source == "reported" and billed(records[0]) == upstream.responses.last.billed
    # Its first token came on the worker that went away: not the resumed text's.
    assert records[0].ttft_ms is None
    assert upstream.responses.posts == 1, "the answer was asked for once"
    assert upstream.responses.gets >= 1, "and streamed again from where it was left"


async def test_an_answer_longer_than_the_grace_is_handed_over_and_completed_by_another_worker(
        django_user_model, upstream, workers):
    a, b = workers()
    [tab] = await tabs_streaming_on(a, django_user_model, 1)

    signalled = time.monotonic()
    a.process.send_signal(signal.SIGTERM)
    assert await tab.close_code() == 1012
    await tab.open(b)
    exited_within(a, 10)
    took = time.monotonic() - signalled
    assert took < 1 + 2, f"A exited {took:.1f} s after the signal (grace 1 s)"
    end = await tab.socket.receive_type("generation.end", timeout=30)

    assert end["status"] == "completed" and end["usage"]["source"] == "reported"
    assert_seen_once_in_order(tab)
    await assert_completed_once_with_the_billed_usage(tab, upstream)
    assert upstream.responses.calls["POST /responses/{id}/cancel"] == 0
    assert "handed over" in a.log() and "handed over by" in b.log()
    await tab.socket.ws.close()


async def test_without_background_mode_an_answer_longer_than_the_grace_is_interrupted(
        django_user_model, upstream, workers):
    a, b = workers(background=False)
    [tab] = await tabs_streaming_on(a, django_user_model, 1)

    a.process.send_signal(signal.SIGTERM)
    assert await tab.close_code() == 1012
    await tab.open(b)
    end = await tab.socket.receive_type("generation.end", timeout=20)

    assert end["status"] == "interrupted"
    saved = await Message.objects.aget(id=tab.message_id)
    assert saved.status == "interrupted" and ANSWER.startswith(saved.content)
    assert upstream.responses.posts == 1 and upstream.responses.gets == 0
    exited_within(a, 10)
    await tab.socket.ws.close()


async def test_an_answer_of_a_killed_worker_is_resumed_by_another_from_its_last_checkpoint(
        django_user_model, upstream, workers):
    a, b = workers(lease_s=2, sweep_s=0.5)
    [tab] = await tabs_streaming_on(a, django_user_model, 1)
    # B is running (its sweeper started by a socket) before A dies.
    watcher = Tab(tab.cookie, tab.conversation_id)
    await watcher.open(b)

    a.kill()
    await tab.open(b)
    end = await tab.socket.receive_type("generation.end", timeout=30)

    assert end["status"] == "completed"
    text, _ = seen_text(tab)
    assert text == ANSWER
    await assert_completed_once_with_the_billed_usage(tab, upstream)
    assert "picked up from" in b.log()
    for socket in (tab.socket, watcher.socket):
        await socket.ws.close()
