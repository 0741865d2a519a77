"""Automatic stops: the repetition
guard and the per-answer cost ceiling stop a run exactly as a ``stop`` frame does
(upstream closed at once, text kept, usage recorded), with ``finish_reason``
``repetition`` or ``cost_limit``, on the WebSocket and the SSE API; the budget reserves
only up to a ceiling; the admin report counts the stops and the tokens they saved.

Unit tests feed chat.generation.autostop's rules text directly; the others run against the
loopback upstream (chat.demo_model.UpstreamServer) answering a looping or a long text.
"""

import asyncio
import logging
import random
import uuid
from decimal import Decimal
from pathlib import Path

import aiohttp
import pytest
from asgiref.sync import sync_to_async
from django.urls import reverse
from rest_framework.test import APIClient

from chat import accounting, checks
from chat import generation as gen
from chat.demo_model import demo_answer, split_tokens
from chat.generation.autostop import AutoStop, CostCeiling, RepetitionGuard, RepetitionRule
from chat.models import ApiToken, Conversation, Message, ModelPrice, UsageRecord, UserBudget

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parent.parent
# An answer that degenerates into a loop after a normal start (about 650 tokens).
LOOP = (
    "Here is what I found about your question.\n\n"
    "- First, the context matters.\n- Second, so do the details.\n\n"
    + "The answer depends on the context of the question, so let me explain it again. " * 40
)
# A long answer that never repeats itself (400 distinct words).
LONG = " ".join(f"word{i}" for i in range(400))
QUESTIONS = [
    "How do rockets work?",
    "Explain streaming and cancellation of generations",
    "What is the best way to learn Portuguese cooking?",
    "Compare PostgreSQL and SQLite for a chat application",
]


def trip_point(tokens: list[str], rule=None) -> int | None:
    """How many of ``tokens`` a fresh guard reads before it trips (None: never)."""
    guard = RepetitionGuard(rule)
    for count, token in enumerate(tokens, 1):
        if guard.feed(token):
            return count
    return None


def ceiling_point(tokens: list[str], **ceiling) -> int | None:
    """How many of ``tokens`` a fresh CostCeiling reads before it is reached."""
    cost = CostCeiling(**{"prompt_tokens": 0, "prices": (Decimal(0), Decimal(0)), **ceiling})
    for count, token in enumerate(tokens, 1):
        if cost.feed(token):
            return count
    return None


def default_prompt_tokens(content: str) -> int:
    """Prompt tokens of the first message ``content`` of a new conversation."""
    from django.conf import settings

    return accounting.count_prompt_tokens([
        {"role": "system", "content": settings.CHAT_SYSTEM_PROMPT},
        {"role": "user", "content": content},
    ])


# --- the repetition guard, alone ----------------------------------------------------------
def test_a_sentence_repeated_over_and_over_trips_the_guard_within_a_few_repeats():
    tokens = split_tokens(LOOP)
    tripped = trip_point(tokens)
    assert tripped is not None
    # The loop is a 15-word sentence: caught at its 6th occurrence, not at the end.
    assert tripped < 130 < len(tokens)


def test_a_numbered_list_repeating_its_item_and_a_repeated_long_line_trip_the_guard():
    numbered = "".join(f"{i}. I completely agree with what you said.\n" for i in range(1, 40))
    assert trip_point(split_tokens(numbered)) is not None
    # A 120-word line repeats too slowly for the n-gram window: the line rule sees it.
    line = " ".join(f"term{i}" for i in range(120)) + "\n"
    assert trip_point(split_tokens(line * 3)) is None
    assert trip_point(split_tokens(line * 8)) is not None


def test_text_without_spaces_is_still_looked_at():
    assert trip_point(list("我认为这是一个好主意。" * 30)) is not None
    assert trip_point(list("人工智能是计算机科学的一个分支，它企图了解智能的实质。")) is None


@pytest.mark.parametrize("question", QUESTIONS)
def test_the_demo_models_markdown_answer_does_not_trip_the_guard(question):
    # Headings, bold, lists, a table and a code block: a normal answer.
    answer = demo_answer([{"role": "user", "content": question}])
    assert trip_point(split_tokens(answer)) is None
    assert not RepetitionGuard().feed(answer)


def test_this_projects_docs_and_code_do_not_trip_the_guard():
    # Real markdown with many tables and lists, and real code with repeated shapes.
    paths = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "chat").glob("*.py")), *sorted((ROOT / "static/chat").glob("*.js"))]
    assert len(paths) > 20
    tripped = [path.name for path in paths if RepetitionGuard().feed(path.read_text())]
    assert tripped == []


@pytest.mark.parametrize("text", [LOOP, LONG, demo_answer([]), "a b\n" * 50,
                                  "x" * 500 + " " + "y" * 70, "我认为这是一个好主意。" * 20])
def test_feeding_token_by_token_or_in_any_pieces_gives_what_feeding_at_once_gives(text):
    at_once = RepetitionGuard()
    expected = at_once.feed(text)
    rng = random.Random(13)
    for pieces in (split_tokens(text), list(text), _random_pieces(text, rng)):
        guard = RepetitionGuard()
        results = [guard.feed(piece) for piece in pieces]
        assert any(results) == expected
        if not expected:
            assert guard.words == at_once.words
    # Once tripped it stays tripped, whatever comes next.
    if expected:
        assert at_once.feed("Something completely different.")


def _random_pieces(text, rng):
    pieces, start = [], 0
    while start < len(text):
        size = rng.randint(1, 12)
        pieces.append(text[start:start + size])
        start += size
    return pieces


def test_a_rule_whose_window_cannot_hold_its_repeats_is_refused_at_start_up(settings):
    with pytest.raises(ValueError, match="repetition_window"):
        RepetitionRule(ngram=8, max_repeats=5, window=10)
    settings.CHAT_TUNING = settings.CHAT_TUNING.replace(repetition_window=10)
    assert [e.id for e in checks.check_repetition_guard()] == ["chat.E005"]
    settings.CHAT_TUNING = settings.CHAT_TUNING.replace(repetition_window=400)
    assert checks.check_repetition_guard() == []


# --- the cost ceiling and the policy, alone ----------------------------------------------
def test_the_cost_ceiling_counts_the_prompt_once_and_the_answer_as_it_streams():
    prices = (Decimal("1000"), Decimal("2000"))  # USD per 1M tokens: $0.001 / $0.002
    cost = CostCeiling(prompt_tokens=16, prices=prices, max_usd=Decimal("0.1"))
    assert cost.cost_usd == Decimal("0.016")
    allowed = cost.answer_tokens_allowed()
    assert allowed == 42  # (0.1 - 0.016) / 0.002
    for _ in range(allowed - 1):
        assert not cost.feed(" word")  # one token each
    assert cost.feed(" word")
    assert cost.completion_tokens == allowed and cost.cost_usd == Decimal("0.1")
    assert CostCeiling(prompt_tokens=5, prices=prices, max_tokens=3).answer_tokens_allowed() == 3


def test_the_tightest_ceiling_applies_and_the_conversation_decides_the_guard(alice, settings):
    settings.CHAT_MAX_ANSWER_USD = Decimal("0.30")
    settings.CHAT_MAX_ANSWER_TOKENS = 500
    settings.CHAT_REPETITION_GUARD = True
    UserBudget.objects.create(user=alice, max_answer_usd=Decimal("0.20"))

    def policy(**fields):
        return AutoStop.for_run(alice, Conversation(owner=alice, **fields), model="test-model",
                                prompt_tokens=10)

    assert policy().limits == {"max_usd": Decimal("0.20"), "max_tokens": 500}
    assert policy(max_answer_usd=Decimal("0.5"), max_answer_tokens=900).limits == {
        "max_usd": Decimal("0.20"), "max_tokens": 500}
    assert policy(max_answer_usd=Decimal("0.05"), max_answer_tokens=50).limits == {
        "max_usd": Decimal("0.05"), "max_tokens": 50}
    assert policy().guard is not None
    assert policy(repetition_guard=False).guard is None
    settings.CHAT_REPETITION_GUARD = False
    assert policy().guard is None
    assert policy(repetition_guard=True).guard is not None
    settings.CHAT_MAX_ANSWER_USD = settings.CHAT_MAX_ANSWER_TOKENS = None
    UserBudget.objects.all().delete()
    assert not policy().active and AutoStop().check("anything") is None


# --- a looping answer, on the WebSocket -------------------------------------------------------
async def test_a_looping_answer_is_stopped_like_a_stop_frame_with_finish_reason_repetition(
    alice, upstream, connect, settings
):
    settings.CHAT_REPETITION_GUARD = True
    upstream.answer = LOOP
    upstream.tokens_per_second = 50
    tokens = split_tokens(LOOP)
    tripped = trip_point(tokens)
    _, _, ws = await connect(alice)
    await ws.receive_type("state")
    await ws.send({"type": "message", "content": "Why?"})
    message_id = (await ws.receive_type("generation.start"))["message"]["id"]
    end = await ws.receive_type("generation.end")

    assert (end["status"], end["finish_reason"], end["error"]) == ("cancelled", "repetition", None)
    request = upstream.requests[-1]
    assert await upstream.until(lambda: request.client_closed_at is not None, 1)
    assert not request.completed
    # Closed right after the chunk that showed the loop, long before the answer's end.
    assert request.chunks_written < tripped + 10 < len(tokens)
    message = await Message.objects.aget(id=message_id)
    assert message.status == "cancelled" and message.finish_reason == "repetition"
    assert message.content == "".join(tokens[:tripped]) == ws.text(message_id)
    record = await UsageRecord.objects.aget(message_id=message_id)
    assert (record.status, record.finish_reason, record.estimated) == (
        "cancelled", "repetition", True)
    assert record.max_tokens == settings.CHAT_MAX_TOKENS
    assert record.completion_tokens == accounting.count_tokens(message.content)
    assert end["usage"]["completion_tokens"] == record.completion_tokens


async def test_without_the_guard_the_same_loop_runs_to_its_end(alice, upstream, connect):
    upstream.answer = LOOP
    upstream.tokens_per_second = 2000
    _, _, ws = await connect(alice)
    await ws.receive_type("state")
    await ws.send({"type": "message", "content": "Why?"})
    end = await ws.receive_type("generation.end")
    assert (end["status"], end["finish_reason"]) == ("completed", "stop")
    assert upstream.requests[-1].completed


# --- a cost ceiling, on the WebSocket and in the generation module ---------------------------
async def test_a_token_ceiling_from_the_first_message_stops_a_long_answer_with_cost_limit(
    alice, upstream, connect
):
    upstream.answer = LONG
    upstream.tokens_per_second = 100
    tokens = split_tokens(LONG)
    reached = ceiling_point(tokens, max_tokens=40)
    _, _, ws = await connect(alice)
    await ws.receive_type("state")
    await ws.send({"type": "message", "content": "Count", "max_answer_tokens": 40,
                   "repetition_guard": False})
    created = await ws.receive_type("message")
    assert created["conversation"]["max_answer_tokens"] == 40
    assert created["conversation"]["repetition_guard"] is False
    message_id = (await ws.receive_type("generation.start"))["message"]["id"]
    end = await ws.receive_type("generation.end")

    assert (end["status"], end["finish_reason"]) == ("cancelled", "cost_limit")
    request = upstream.requests[-1]
    assert await upstream.until(lambda: request.client_closed_at is not None, 1)
    assert request.chunks_written < reached + 10 < len(tokens)
    message = await Message.objects.aget(id=message_id)
    assert message.content == "".join(tokens[:reached]) == ws.text(message_id)
    # The whole text counted at once may differ from the running count by a token.
    assert abs(end["usage"]["completion_tokens"] - 40) <= 1
    record = await UsageRecord.objects.aget(message_id=message_id)
    assert record.finish_reason == "cost_limit" and record.status == "cancelled"


async def test_a_usd_ceiling_stops_the_answer_at_the_tightest_of_server_budget_and_conversation(
    alice, upstream, settings
):
    # $0.001 per prompt token and $0.002 per answer token make the ceilings small numbers.
    await ModelPrice.objects.acreate(model="test-model", input_per_mtok=Decimal("1000"),
                                     output_per_mtok=Decimal("2000"))
    settings.CHAT_MAX_ANSWER_USD = Decimal("0.5")
    await UserBudget.objects.acreate(user=alice, max_answer_usd=Decimal("0.2"))
    conversation = await Conversation.objects.acreate(
        owner=alice, model="test-model", max_answer_usd=Decimal("0.1")
    )
    upstream.answer = LONG
    upstream.tokens_per_second = 200
    tokens = split_tokens(LONG)
    prompt_tokens = default_prompt_tokens("Count")
    reached = ceiling_point(tokens, prompt_tokens=prompt_tokens,
                            prices=(Decimal("1000"), Decimal("2000")), max_usd=Decimal("0.1"))
    generation = await gen.start_generation(alice, conversation.id, "Count")
    end = await asyncio.wait_for(generation.wait(), 10)

    assert (end["status"], end["finish_reason"]) == ("cancelled", "cost_limit")
    assert "".join(generation.text) == "".join(tokens[:reached])
    assert generation.run.autostop.limits["max_usd"] == Decimal("0.1")
    record = await UsageRecord.objects.aget(message_id=generation.message_id)
    # At the ceiling, within a token's price of it (the record counts the whole text).
    assert abs(record.cost_usd - Decimal("0.1")) <= Decimal("0.002")
    assert await upstream.until(lambda: upstream.requests[-1].client_closed_at is not None, 1)


async def test_with_a_ceiling_the_budget_reserves_only_up_to_it(alice, upstream):
    await UserBudget.objects.acreate(user=alice, tokens_per_day=300)
    upstream.answer = "A short answer."
    plain = await Conversation.objects.acreate(owner=alice, model="test-model")
    with pytest.raises(gen.QuotaExceeded) as refused:
        await gen.start_generation(alice, plain.id, "Hello")
    # Without a ceiling the request counts its whole max_tokens (1024 > 300).
    assert refused.value.extra["requested"]["tokens"] == default_prompt_tokens("Hello") + 1024
    assert upstream.requests == []

    capped = await Conversation.objects.acreate(owner=alice, model="test-model",
                                                max_answer_tokens=100)
    generation = await gen.start_generation(alice, capped.id, "Hello")
    end = await asyncio.wait_for(generation.wait(), 10)
    assert end["status"] == "completed"
    assert len(upstream.requests) == 1


async def test_a_prompt_that_alone_reaches_the_usd_ceiling_is_refused_before_anything_is_sent(
    alice, upstream
):
    await ModelPrice.objects.acreate(model="test-model", input_per_mtok=Decimal("1000"),
                                     output_per_mtok=Decimal("2000"))
    conversation = await Conversation.objects.acreate(owner=alice, model="test-model",
                                                      max_answer_usd=Decimal("0.001"))
    with pytest.raises(gen.QuotaExceeded) as refused:
        await gen.start_generation(alice, conversation.id, "Hello")
    assert refused.value.extra["limit"] == "max_answer_usd"
    assert "cost limit of an answer" in refused.value.detail
    assert upstream.requests == []
    assert await Message.objects.acount() == 0


async def test_a_bad_ceiling_in_the_first_message_is_an_invalid_error_and_saves_nothing(
    alice, upstream, connect
):
    _, _, ws = await connect(alice)
    await ws.receive_type("state")
    for field, value in [("max_answer_usd", "-1"), ("max_answer_usd", "1e3"),
                         ("max_answer_tokens", 0), ("max_answer_tokens", "40"),
                         ("repetition_guard", "yes")]:
        await ws.send({"type": "message", "content": "Hello", field: value})
        error = await ws.receive_type("error")
        assert error["code"] == "invalid" and field in error["detail"]
    assert await Conversation.objects.acount() == 0
    assert upstream.requests == []


# --- the log ----------------------------------------------------------------------------------
async def test_the_end_of_run_log_says_the_finish_reason_and_what_stopped_a_run(
    alice, upstream, settings, caplog
):
    caplog.set_level(logging.INFO, logger="chat.generation")
    upstream.tokens_per_second = 2000
    upstream.answer = "A short answer."
    done = await gen.start_generation(alice, uuid.uuid4(), "Hello")
    await done.wait()
    upstream.tokens_per_second = 50
    upstream.answer = LONG
    stopped = await gen.start_generation(alice, uuid.uuid4(), "Hello")
    await upstream.until(lambda: upstream.requests[-1].chunks_written >= 2)
    stopped.cancel("stop")
    await stopped.wait()
    settings.CHAT_REPETITION_GUARD = True
    upstream.tokens_per_second = 2000
    upstream.answer = LOOP
    looped = await gen.start_generation(alice, uuid.uuid4(), "Hello")
    await looped.wait()

    lines = {r.getMessage().split()[1]: r.getMessage() for r in caplog.records
             if r.getMessage().startswith("generation ") and " after " in r.getMessage()}
    assert lines[done.message_id].endswith("(finish_reason=stop)")
    assert lines[stopped.message_id].endswith("(finish_reason=cancelled, stopped by stop frame)")
    assert lines[looped.message_id].endswith(
        "(finish_reason=repetition, stopped by repetition guard)")


# --- the REST API -------------------------------------------------------------------------------
def api_client(user) -> APIClient:
    client = APIClient()
    _, key = ApiToken.issue(user, "tests")
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    return client


def test_a_conversations_automatic_stops_are_read_and_changed_through_the_api(alice):
    client = api_client(alice)
    created = client.post("/api/conversations/", {"max_answer_usd": "0.05"}, format="json")
    assert created.status_code == 201, created.content
    body = created.json()
    assert (body["repetition_guard"], body["max_answer_usd"], body["max_answer_tokens"]) == (
        None, "0.05000000", None)
    url = f"/api/conversations/{body['id']}/"
    changed = client.patch(url, {"repetition_guard": True, "max_answer_tokens": 300,
                                 "max_answer_usd": None}, format="json")
    assert changed.status_code == 200, changed.content
    conversation = Conversation.objects.get(id=body["id"])
    assert (conversation.repetition_guard, conversation.max_answer_tokens,
            conversation.max_answer_usd) == (True, 300, None)
    for field, value in [("max_answer_usd", 0.05), ("max_answer_usd", "-1"),
                         ("max_answer_usd", "1e3"), ("max_answer_usd", "0.123456789"),
                         # A blank string is not null (DRF's decimal field read it so).
                         ("max_answer_usd", ""), ("max_answer_usd", "  "),
                         ("max_answer_tokens", 0), ("max_answer_tokens", "300"),
                         ("max_answer_tokens", 1.5), ("repetition_guard", "yes"),
                         ("repetition_guard", 1)]:
        refused = client.patch(url, {field: value}, format="json")
        assert refused.status_code == 400 and field in refused.json(), (field, value)
    conversation.refresh_from_db()
    assert (conversation.repetition_guard, conversation.max_answer_tokens) == (True, 300)
    blank = client.post("/api/conversations/", {"max_answer_usd": ""}, format="json")
    assert blank.status_code == 400 and "max_answer_usd" in blank.json()
    assert Conversation.objects.count() == 1


async def test_the_sse_api_gets_the_same_end_when_the_answer_loops(asgi_server, upstream, alice):
    upstream.answer = LOOP
    upstream.tokens_per_second = 100
    tokens = split_tokens(LOOP)
    _, key = await sync_to_async(ApiToken.issue)(alice, "sse")
    headers = {"Authorization": f"Token {key}"}
    events = []
    async with aiohttp.ClientSession(headers=headers) as session:
        async with session.post(f"{asgi_server.url}/api/conversations/", json={}) as response:
            conversation_id = (await response.json())["id"]
        url = f"{asgi_server.url}/api/conversations/{conversation_id}/"
        async with session.patch(url, json={"repetition_guard": True}) as response:
            assert response.status == 200
        async with session.post(url + "messages/", json={"content": "Why?"},
                                headers={"Accept": "text/event-stream"}) as response:
            assert response.status == 200
            buffer = ""
            async for chunk in response.content.iter_any():
                buffer += chunk.decode()
                if "event: generation.end" in buffer:
                    break
        events = [block for block in buffer.split("\n\n") if block.startswith("event:")]
        async with session.get(url + "messages/") as response:
            listed = (await response.json())["results"]
    end = events[-1]
    assert end.startswith("event: generation.end")
    assert '"finish_reason": "repetition"' in end and '"status": "cancelled"' in end
    assert listed[-1]["finish_reason"] == "repetition" and listed[-1]["status"] == "cancelled"
    request = upstream.requests[-1]
    assert await upstream.until(lambda: request.client_closed_at is not None, 1)
    assert request.chunks_written < trip_point(tokens) + 10 < len(tokens)


# --- the admin report ---------------------------------------------------------------------------
def test_the_report_counts_runs_stopped_by_each_rule_and_the_tokens_they_saved(
    admin_client, alice
):
    def record(finish_reason, completion, max_tokens=1024, status="cancelled"):
        UsageRecord.objects.create(
            user=alice, model="test-model", status=status, finish_reason=finish_reason,
            prompt_tokens=20, completion_tokens=completion, total_tokens=20 + completion,
            max_tokens=max_tokens, cost_usd=Decimal("0.001"),
        )

    record("repetition", 100)
    record("repetition", 224)
    record("cost_limit", 40, max_tokens=512)
    record("cost_limit", 30, max_tokens=None)  # older than the field: nothing counted saved
    record("cancelled", 10)
    record("stop", 600, status="completed")
    response = admin_client.get(reverse("admin:chat_usagerecord_report"))
    assert response.status_code == 200
    rows = {row["finish_reason"]: row for row in response.context["automatic_stops"]}
    assert (rows["repetition"]["runs"], rows["repetition"]["tokens_saved"]) == (2, 924 + 800)
    assert rows["repetition"]["completion_tokens"] == 324
    assert (rows["cost_limit"]["runs"], rows["cost_limit"]["tokens_saved"]) == (2, 472)
    html = response.content.decode()
    assert 'id="automatic-stops"' in html and "Repetition guard" in html
    assert "?finish_reason=repetition" in html


async def test_a_real_stopped_run_shows_in_the_report(alice, upstream, settings, admin_client):
    settings.CHAT_REPETITION_GUARD = True
    upstream.answer = LOOP
    upstream.tokens_per_second = 2000
    generation = await gen.start_generation(alice, uuid.uuid4(), "Why?")
    await generation.wait()
    response = await sync_to_async(admin_client.get)(reverse("admin:chat_usagerecord_report"))
    rows = {row["finish_reason"]: row for row in response.context["automatic_stops"]}
    record = await UsageRecord.objects.aget(message_id=generation.message_id)
    assert rows["repetition"]["runs"] == 1
    assert rows["repetition"]["tokens_saved"] == 1024 - record.completion_tokens > 0
