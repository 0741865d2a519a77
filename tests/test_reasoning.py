"""An answer's reasoning ("thinking") text: streamed to every tab
as ``reasoning`` frames numbered in the deltas' seq series, carried by state frames,
saved with the answer, kept when a stop lands while the model still thinks, and shown
in the page as a collapsible "Thinking" part above the answer.
"""

import os
import uuid
from pathlib import Path

import pytest
from channels.db import database_sync_to_async
from playwright.sync_api import expect, sync_playwright

from chat import generation as gen
from chat.generation import leases, store
from chat.models import Conversation, Message, UsageRecord
from tests.conftest import session_cookie
from tests.test_browser import (  # noqa: F401 - the browser fixtures, shared
    CHROMIUM,
    answer,
    asgi_server,
    context,
    expect_online,
    open_chat,
    raw_answer,
    send,
)

pytestmark = pytest.mark.django_db(transaction=True)

ANSWER = "The sky is blue because air scatters blue light the most."


@pytest.fixture
def browser():
    """Chromium for one test (tests/test_browser.py keeps one per module): Playwright's
    sync API holds an event loop in this thread while it runs, which the async tests of
    this module cannot share. Django's async-unsafe switch is on meanwhile, for the same
    reason as there (allow_orm_beside_playwright)."""
    old = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM, headless=True,
                args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                      "--disable-background-networking", "--disable-component-update",
                      "--disable-sync"],
            )
            yield browser
            browser.close()
    finally:
        if old is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = old


@pytest.fixture
def thinking(upstream, settings):
    """The loopback upstream speaking DeepSeek (``delta.reasoning_content``) with a
    reasoning phase of 10 tokens before the answer."""
    upstream.dialect = "deepseek"
    upstream.answer = ANSWER
    upstream.reasoning_tokens = 10
    upstream.tokens_per_second = 40
    settings.OPENAI_PROVIDER = "deepseek"
    return upstream


async def open_tabs(connect, user, count):
    conversation_id = uuid.uuid4()
    tabs = []
    for _ in range(count):
        _, _, ws = await connect(user, conversation_id)
        await ws.receive_type("state")
        tabs.append(ws)
    return conversation_id, tabs


def stream_frames(ws, message_id):
    return [f for f in ws.frames if f["type"] in ("delta", "reasoning")
            and f["message_id"] == message_id]


def joined(frames, kind):
    return "".join(f["content"] for f in frames if f["type"] == kind)


async def test_two_tabs_see_the_reasoning_then_the_answer_in_one_seq_series(
        alice, thinking, connect):
    _, (first, second) = await open_tabs(connect, alice, 2)
    await first.send({"type": "message", "content": "Why is the sky blue?"})
    message_id = (await first.receive_type("generation.start"))["message"]["id"]
    ends = [await ws.receive_type("generation.end") for ws in (first, second)]
    assert [end["status"] for end in ends] == ["completed", "completed"]

    request = thinking.requests[-1]
    message = await Message.objects.aget(id=message_id)
    assert message.reasoning == "".join(request.reasoning_written) != ""
    assert message.content == ANSWER
    for ws in (first, second):
        frames = stream_frames(ws, message_id)
        assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))
        kinds = [f["type"] for f in frames]
        # All the reasoning first, then the answer: the order the provider sent them.
        assert kinds == sorted(kinds, key=lambda k: k != "reasoning")
        assert "reasoning" in kinds and "delta" in kinds
        assert joined(frames, "reasoning") == message.reasoning
        assert joined(frames, "delta") == message.content
    assert ends[0]["usage"]["source"] == "reported"


async def test_a_tab_joining_while_the_model_thinks_gets_the_reasoning_in_its_state(
        alice, thinking, connect):
    thinking.tokens_per_second = 10
    conversation_id, (first,) = await open_tabs(connect, alice, 1)
    await first.send({"type": "message", "content": "Why is the sky blue?"})
    message_id = (await first.receive_type("generation.start"))["message"]["id"]
    await first.receive_type("reasoning")
    _, _, late = await connect(alice, conversation_id)
    state = await late.receive_type("state")
    snapshot = state["generation"]
    assert snapshot["message_id"] == message_id and snapshot["reasoning"]
    shown = next(m for m in state["messages"] if m["id"] == message_id)
    assert shown["reasoning"] == snapshot["reasoning"]
    await late.receive_type("generation.end", timeout=15)
    later = [f for f in stream_frames(late, message_id) if f["seq"] > snapshot["seq"]]
    message = await Message.objects.aget(id=message_id)
    # The snapshot plus the frames after it are the whole reasoning and answer, once.
    assert snapshot["reasoning"] + joined(later, "reasoning") == message.reasoning
    assert snapshot["content"] + joined(later, "delta") == message.content


async def test_stop_while_the_model_thinks_closes_the_upstream_and_keeps_the_reasoning(
        alice, thinking, connect):
    thinking.tokens_per_second = 10
    _, (ws,) = await open_tabs(connect, alice, 1)
    await ws.send({"type": "message", "content": "Why is the sky blue?"})
    message_id = (await ws.receive_type("generation.start"))["message"]["id"]
    await ws.receive_type("reasoning")
    await ws.send({"type": "stop"})
    end = await ws.receive_type("generation.end")

    request = thinking.requests[-1]
    assert await thinking.until(lambda: request.client_closed_at is not None, timeout=1.0)
    assert request.chunks_written == 0 and not request.completed
    assert len(request.reasoning_written) < thinking.reasoning_tokens
    assert end["status"] == "cancelled"
    message = await Message.objects.aget(id=message_id)
    assert message.content == ""
    assert message.reasoning == joined(stream_frames(ws, message_id), "reasoning") != ""
    assert "".join(request.reasoning_written).startswith(message.reasoning)
    usage = await UsageRecord.objects.aget(message_id=message_id)
    # DeepSeek sends no usage before its end: the reasoning seen is what is counted.
    assert usage.source == "estimated" and usage.completion_tokens > 0
    assert end["usage"] == usage.to_dict()


async def test_a_checkpoint_saves_the_reasoning_so_far_and_leaves_other_runs_theirs(
        alice, bob, thinking):
    thinking.tokens_per_second = 10
    generation = await gen.start_generation(alice, uuid.uuid4(), "Why is the sky blue?")
    assert await thinking.until(lambda: thinking.requests
                                and len(thinking.requests[-1].reasoning_written) >= 2)
    await leases.checkpoint_running()
    saved = await Message.objects.aget(id=generation.message_id)
    assert saved.reasoning and "".join(generation.reasoning).startswith(saved.reasoning)
    # A batch where one run has no reasoning: that row keeps what it has.
    other = await Message.objects.acreate(
        conversation=await Conversation.objects.acreate(owner=bob, title="other"),
        role="assistant", status="streaming", reasoning="kept")
    await database_sync_to_async(store.checkpoint_many)(
        {str(other.id): "text", generation.message_id: "x"},
        {generation.message_id: "thought"})
    await other.arefresh_from_db()
    await saved.arefresh_from_db()
    assert (other.content, other.reasoning) == ("text", "kept")
    assert saved.reasoning == "thought"
    generation.cancel()
    await generation.wait()


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed")
def test_the_page_shows_the_thinking_part_open_while_it_streams_and_kept_on_reload(
        context, alice, asgi_server, upstream):  # noqa: F811
    upstream.dialect = "deepseek"  # read by the live server's generic profile
    upstream.answer = ANSWER
    upstream.reasoning_tokens = 30
    upstream.tokens_per_second = 12
    name, value = session_cookie(alice).split("=", 1)
    context.add_cookies([{"name": name, "value": value, "url": asgi_server.url}])
    page = open_chat(context)
    # Provider text goes in as text: markup in the reasoning (it quotes the question)
    # must not run.
    send(page, "Why <img src=x onerror=window.pwned=1> is the sky blue?")
    thinking = answer(page).locator("details.msg-thinking")
    expect(thinking).to_be_visible()
    expect(thinking).to_have_attribute("open", "")
    expect(thinking.locator(".thinking-text")).to_contain_text("Let me think about")
    assert answer(page).locator(".msg-body").inner_text() == ""
    # The answer starts: the Thinking part closes, its text stays.
    expect(answer(page).locator(".msg-body")).to_contain_text("The sky", timeout=15_000)
    expect(thinking).not_to_have_attribute("open", "")
    expect(answer(page)).to_have_attribute("data-status", "completed", timeout=15_000)
    expect(thinking).not_to_have_attribute("open", "")
    shown = raw_answer(page)
    assert shown["reasoning"] and "<img" in shown["reasoning"]
    assert thinking.locator(".thinking-text img").count() == 0
    assert page.evaluate("() => window.pwned") is None
    assert Message.objects.get(id=shown["id"]).reasoning == shown["reasoning"]

    page.reload()
    expect_online(page)
    thinking = answer(page).locator("details.msg-thinking")
    expect(thinking).to_be_visible()
    expect(thinking).not_to_have_attribute("open", "")
    thinking.locator("summary").click()
    expect(thinking.locator(".thinking-text")).to_have_text(shown["reasoning"])
    assert context.page_errors == []


async def test_the_answer_s_token_ceiling_counts_the_reasoning_it_is_billed_for(
        alice, thinking, connect):
    thinking.reasoning_tokens = 40
    _, (ws,) = await open_tabs(connect, alice, 1)
    await ws.send({"type": "message", "content": "Why is the sky blue?",
                   "max_answer_tokens": 5})
    message_id = (await ws.receive_type("generation.start"))["message"]["id"]
    end = await ws.receive_type("generation.end")

    request = thinking.requests[-1]
    assert await thinking.until(lambda: request.client_closed_at is not None, timeout=1.0)
    assert (end["status"], end["finish_reason"]) == ("cancelled", "cost_limit")
    # Stopped while it still thought: no answer text, the reasoning so far kept.
    assert request.chunks_written == 0
    assert len(request.reasoning_written) < thinking.reasoning_tokens
    message = await Message.objects.aget(id=message_id)
    assert message.content == "" and message.reasoning
