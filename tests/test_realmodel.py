"""The app against a real inference engine: llama.cpp's llama-server
serving SmolLM2-135M-Instruct on CPU, reached through the openai SDK like any provider.

What the loopback test upstream cannot show, the engine's own counters can: how many
tokens it really generated (``/metrics``) against what the app saved and billed
(counted with the model's tokenizer, ``/tokenize``). A stop or a disconnect must leave
the engine at most 2 tokens beyond the saved answer (the tokens already in flight), and
a completed run's usage must be the engine's count, not an estimate.

Skipped unless ``REALMODEL=1`` or ``--realmodel``; ``TEST_CONFIGS=realmodel bash
scripts/test.sh`` runs them (the first run builds llama-server, tests/realmodel.py).
The figures measured are printed in the terminal summary.
"""

import asyncio

import aiohttp
import pytest
from django.conf import settings

from chat import accounting
from chat.models import ApiToken, Conversation, Message, UsageRecord
from tests import realmodel
from tests.live import LiveServer
from tests.test_api_sse import read_events

pytestmark = [pytest.mark.realmodel, pytest.mark.django_db(transaction=True)]

# SmolLM2-135M goes on for well over 200 tokens with this (CHAT_MAX_TOKENS is 200), so a
# stop after a few deltas always lands mid-answer.
LONG_PROMPT = (
    "Write a long story about a lighthouse keeper who finds a message in a bottle. "
    "Describe the sea, the island and every day of his week in detail."
)
# Deltas carry 2-3 tokens each at the engine's speed (coalesced over 30 ms): a stop
# lands 10-15 tokens into the answer.
STOP_AFTER_DELTAS = 5
# In flight when the app closes the connection: sampled and sent, not read yet.
MAX_TOKENS_BEYOND_SAVED = 2


def report(request, record_property, **figures) -> None:
    """Keep a test's measured figures for the terminal summary and the JUnit XML."""
    realmodel.FIGURES.append((request.node.name, figures))
    for key, value in figures.items():
        record_property(key, value)


async def engine_count(engine) -> int:
    """The engine's tokens_predicted counter, once no request is running."""
    return await asyncio.to_thread(engine.tokens_predicted)


async def ended(message_id, timeout: float = 15) -> Message:
    """The assistant message once it is no longer ``streaming``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        message = await Message.objects.aget(id=message_id)
        if message.status != Message.Status.STREAMING or loop.time() > deadline:
            return message
        await asyncio.sleep(0.05)


async def start_run(ws, content=LONG_PROMPT) -> str:
    """Send a message on a fresh socket; the assistant message id."""
    await ws.receive_type("state")
    await ws.send({"type": "message", "content": content})
    start = await ws.receive_type("generation.start", timeout=30)
    return start["message"]["id"]


async def receive_deltas(ws, count: int) -> None:
    while len(ws.deltas()) < count:
        frame = await ws.receive(timeout=30)
        assert frame["type"] != "generation.end", f"the answer ended early: {frame}"


async def beyond_saved(engine, before: int, message: Message) -> dict:
    """Tokens the engine generated for this run, tokens of the saved answer by the
    model's tokenizer, and the difference."""
    generated = await engine_count(engine) - before
    saved = await asyncio.to_thread(engine.count_tokens, message.content)
    return {"generated": generated, "saved": saved, "beyond_saved": generated - saved}


# --- WebSocket --------------------------------------------------------------------------
@pytest.fixture(params=["chat", "responses"])
def api(request, engine, settings):
    """Each WebSocket test through both provider APIs: Chat Completions and the
    Responses API (llama-server serves POST /v1/responses too)."""
    settings.OPENAI_API = request.param
    return request.param


async def test_a_completed_runs_usage_is_the_engines_own_count(
    alice, engine, api, connect, request, record_property
):
    before = await engine_count(engine)
    _, _, ws = await connect(alice)
    message_id = await start_run(ws)
    end = await ws.receive_type("generation.end", timeout=120)

    generated = await engine_count(engine) - before
    usage = await UsageRecord.objects.aget(message_id=message_id)
    message = await Message.objects.aget(id=message_id)
    prompt = [
        {"role": "system", "content": settings.CHAT_SYSTEM_PROMPT},
        {"role": "user", "content": LONG_PROMPT},
    ]
    engine_prompt = await asyncio.to_thread(engine.count_prompt_tokens, prompt)
    report(
        request, record_property,
        completion_tokens=usage.completion_tokens, engine_generated=generated,
        # The saved text re-tokenized: how far a count after the fact can drift.
        tokenized_completion=await asyncio.to_thread(engine.count_tokens, message.content),
        prompt_tokens=usage.prompt_tokens, engine_prompt=engine_prompt,
        tiktoken_completion=accounting.count_tokens(message.content),
        tiktoken_prompt=accounting.count_prompt_tokens(prompt),
    )
    assert end["status"] == "completed" and message.content == ws.text(message_id) != ""
    assert usage.estimated is False
    assert usage.completion_tokens == generated
    assert usage.prompt_tokens == engine_prompt
    assert end["usage"]["completion_tokens"] == generated


async def test_a_stop_leaves_the_engine_at_most_2_tokens_beyond_the_saved_answer(
    alice, engine, api, connect, request, record_property
):
    before = await engine_count(engine)
    _, _, ws = await connect(alice)
    message_id = await start_run(ws)
    await receive_deltas(ws, STOP_AFTER_DELTAS)
    await ws.send({"type": "stop"})
    end = await ws.receive_type("generation.end", timeout=15)

    message = await Message.objects.aget(id=message_id)
    figures = await beyond_saved(engine, before, message)
    usage = await UsageRecord.objects.aget(message_id=message_id)
    report(
        request, record_property, **figures,
        usage_completion_tokens=usage.completion_tokens,
        usage_error=usage.completion_tokens - figures["generated"],
    )
    assert end["status"] == "cancelled" and message.status == Message.Status.CANCELLED
    assert message.content == ws.text(message_id) != ""
    assert figures["beyond_saved"] <= MAX_TOKENS_BEYOND_SAVED


async def test_a_closed_socket_leaves_the_engine_at_most_2_tokens_beyond_the_saved_answer(
    alice, engine, api, connect, request, record_property
):
    before = await engine_count(engine)
    _, _, ws = await connect(alice)
    message_id = await start_run(ws)
    await receive_deltas(ws, STOP_AFTER_DELTAS)
    received = ws.text(message_id)
    await ws.close()

    message = await ended(message_id)
    figures = await beyond_saved(engine, before, message)
    report(request, record_property, **figures)
    assert message.status == Message.Status.CANCELLED
    assert message.content.startswith(received) and received
    assert figures["beyond_saved"] <= MAX_TOKENS_BEYOND_SAVED


async def test_a_stopped_runs_usage_is_tokenized_within_2_tokens_of_the_engines_count(
    alice, engine, api, connect, request, record_property
):
    before = await engine_count(engine)
    _, _, ws = await connect(alice)
    message_id = await start_run(ws)
    await receive_deltas(ws, STOP_AFTER_DELTAS)
    await ws.send({"type": "stop"})
    await ws.receive_type("generation.end", timeout=15)

    generated = await engine_count(engine) - before
    usage = await UsageRecord.objects.aget(message_id=message_id)
    report(
        request, record_property, engine_generated=generated,
        usage_completion_tokens=usage.completion_tokens,
        usage_error=usage.completion_tokens - generated,
        usage_source=usage.source,
    )
    assert usage.source == "tokenized"
    assert abs(usage.completion_tokens - generated) <= MAX_TOKENS_BEYOND_SAVED


# --- SSE on a live daphne -----------------------------------------------------------------
@pytest.fixture
def live_app(transactional_db, engine):
    """A daphne process of the app on the test database, pointed at the engine."""
    server = LiveServer(
        {
            "OPENAI_BASE_URL": engine.base_url,
            "OPENAI_API_KEY": "test-key-not-secret",
            "OPENAI_MAX_RETRIES": "0",
            "CHAT_MODEL": engine.model,
            "CHAT_MAX_TOKENS": "200",
            "CHAT_CONTEXT_TOKENS": str(engine.context),
        },
        name="realmodel-live",
    ).start()
    yield server
    server.stop()


async def test_an_sse_disconnect_leaves_the_engine_at_most_2_tokens_beyond_the_saved_answer(
    alice, engine, live_app, request, record_property
):
    _, key = await asyncio.to_thread(ApiToken.issue, alice, "realmodel")
    conversation = await Conversation.objects.acreate(owner=alice)
    before = await engine_count(engine)
    received = ""
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            f"{live_app.url}/api/conversations/{conversation.id}/messages/",
            json={"content": LONG_PROMPT},
            headers={"Authorization": f"Token {key}", "Accept": "text/event-stream"},
        )
        assert response.status == 200
        async for event, data in read_events(response):
            assert event != "generation.end", f"the answer ended early: {data}"
            if event == "generation.start":
                message_id = data["message"]["id"]
            if event == "delta":
                received += data["content"]
                if data["seq"] >= STOP_AFTER_DELTAS:
                    break
        # Drop the TCP connection mid-stream, as a script killed with Ctrl-C would.
        response.close()

    message = await ended(message_id)
    figures = await beyond_saved(engine, before, message)
    report(request, record_property, **figures)
    assert message.status == Message.Status.CANCELLED, live_app.log()[-2000:]
    assert message.content.startswith(received) and received
    assert figures["beyond_saved"] <= MAX_TOKENS_BEYOND_SAVED

