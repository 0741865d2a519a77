"""No frame closes a socket with 1011.

A Hypothesis fuzzer throws bad frames at alice's socket on a conversation with saved
messages: random JSON values and nesting, unicode with lone surrogates, NUL and control
characters, sizes around the limits, binary frames, and floods of them sent without
waiting. Whatever it sends, every bad frame is answered with exactly one ``error``
frame of the documented code, the socket answers ``sync`` with a ``state`` frame
afterwards, and nothing saved changes. It drives the real ASGI application in process
(fast); the live test repeats the frames that crashed a daphne socket with 1011.
"""

import asyncio
import json
import logging
import os
import uuid
from datetime import timedelta

import pytest
import websockets
from asgiref.sync import sync_to_async
from django.utils import timezone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chat import consumers
from chat import generation as gen
from chat.generation import autostop
from chat.models import Conversation, Message, UsageRecord
from tests.conftest import session_cookie

pytestmark = pytest.mark.django_db(transaction=True)

# Small limits keep the examples small; the rules do not depend on the numbers.
MAX_CHARS = 200
FRAME_LIMIT = MAX_CHARS * 4 + 1024  # ChatConsumer.handle_frame
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "120"))
KNOWN_TYPES = {"message", "stop", "regenerate", "edit", "sync"}

# --- strategies ---------------------------------------------------------------------------
surrogates = st.characters(categories=["Cs"])
odd_chars = st.sampled_from(["\x00", "\x01", "\x08", "\x1b", "\x7f", "\x85", "\u2028",
                             "\ufeff", "\uffff", "\U0010ffff", "\U0001f600"])
any_char = st.one_of(st.characters(), surrogates, odd_chars)
any_text = st.text(any_char, max_size=40)
blank_text = st.text(st.sampled_from([" ", "\t", "\n", "\r", "\x00", "\x0b", "\u3000"]),
                     max_size=30)
with_surrogate = st.builds(lambda a, s, b: a + s + b, any_text, surrogates, any_text)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | any_text,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(any_text, children, max_size=4),
    max_leaves=20,
)
containers = st.lists(json_values, max_size=4) | st.dictionaries(any_text, json_values, max_size=4)
non_strings = st.none() | st.booleans() | st.integers() | st.floats() | containers
present_non_strings = st.booleans() | st.integers() | st.floats() | containers
good_content = st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]),
                       min_size=1, max_size=50).filter(str.strip)
# Keys a `message` frame reads; `extra` keys are anything else.
MESSAGE_KEYS = {"type", "content", "model", "system_prompt", *autostop.CONVERSATION_FIELDS}


def refused_for(key):
    """True for a value the automatic-stop field ``key`` does not take."""
    def refused(value) -> bool:
        try:
            autostop.conversation_fields({key: value})
        except gen.InvalidRequest:
            return True
        return False
    return refused


def dumps(value, ascii_only: bool) -> str:
    return json.dumps(value, ensure_ascii=ascii_only)


def frame(expected: str, value, ascii_only=True) -> tuple[str, str]:
    return dumps(value, ascii_only), expected


@st.composite
def bad_frames(draw) -> tuple[str | bytes, set[str]]:
    """``(frame sent, error codes it may get)``: text (str) or binary (bytes). Any text
    frame over the limit gets ``too_large``: the consumer checks the size first."""
    raw, codes = draw(_bad_frames())
    if isinstance(raw, str) and len(raw) > FRAME_LIMIT:
        return raw, {"too_large"}
    return raw, codes


@st.composite
def _bad_frames(draw) -> tuple[str | bytes, set[str]]:
    ascii_only = draw(st.booleans())
    extra = draw(st.dictionaries(any_text.filter(lambda k: k not in MESSAGE_KEYS),
                                 json_values, max_size=3))
    kind = draw(st.sampled_from([
        "not_object", "no_type", "unknown_type", "content", "model", "system_prompt",
        "autostop", "not_json", "nested", "binary", "oversized",
    ]))
    if kind == "not_object":
        raw = dumps(draw(json_values.filter(lambda v: not isinstance(v, dict))), ascii_only)
        return raw, {"too_large"} if len(raw) > FRAME_LIMIT else {"bad_frame"}
    if kind == "no_type":
        value = {**extra, **draw(st.just({}) | st.fixed_dictionaries({"type": non_strings}))}
        raw = dumps(value, ascii_only)
        return raw, {"too_large"} if len(raw) > FRAME_LIMIT else {"bad_frame"}
    if kind == "unknown_type":
        value = {**extra, "type": draw(any_text.filter(lambda t: t not in KNOWN_TYPES))}
        raw = dumps(value, ascii_only)
        return raw, {"too_large"} if len(raw) > FRAME_LIMIT else {"unknown_type"}
    if kind == "content":
        content, code = draw(st.one_of(
            st.tuples(non_strings, st.just("empty")),
            st.tuples(blank_text, st.just("empty")),
            st.tuples(with_surrogate, st.just("invalid")),
            st.tuples(st.text(any_char, min_size=MAX_CHARS + 1, max_size=MAX_CHARS + 60),
                      st.just("too_large")),
        ))
        value = {**extra, "type": draw(st.sampled_from(["message", "edit"])), "content": content}
        raw = dumps(value, ascii_only)
        return raw, {"too_large"} if len(raw) > FRAME_LIMIT else {code}
    if kind in ("model", "system_prompt"):
        bad, code = draw(st.one_of(
            st.tuples(present_non_strings, st.just("bad_frame")),
            st.tuples(with_surrogate, st.just("invalid")),
        ))
        value = {**extra, "type": "message", "content": draw(good_content), kind: bad}
        raw = dumps(value, ascii_only)
        return raw, {"too_large"} if len(raw) > FRAME_LIMIT else {code}
    if kind == "autostop":
        key = draw(st.sampled_from(autostop.CONVERSATION_FIELDS))
        bad = draw(json_values.filter(refused_for(key)))
        value = {**extra, "type": "message", "content": draw(good_content), key: bad}
        raw = dumps(value, ascii_only)
        return raw, {"too_large"} if len(raw) > FRAME_LIMIT else {"invalid"}
    if kind == "not_json":
        text = draw(st.text(any_char, max_size=200).filter(_not_json))
        return text, {"bad_json"}
    if kind == "nested":
        # Deeper than the interpreter's recursion limit (1000) fits under the frame limit
        # when the brackets are left open; json.loads raised RecursionError there.
        opening, closing = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        depth = draw(st.integers(1, FRAME_LIMIT // len(opening)))
        closed = draw(st.booleans())
        text = opening * depth + ("1" + closing * depth if closed else "")
        return text, ({"too_large"} if len(text) > FRAME_LIMIT else {"bad_json", "bad_frame"})
    if kind == "binary":
        return draw(st.binary(max_size=FRAME_LIMIT + 100)), {"bad_frame"}
    size = draw(st.integers(FRAME_LIMIT + 1, FRAME_LIMIT + 2000))
    return json.dumps({"type": "message", "content": "x" * size}), {"too_large"}


def _not_json(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return True
    return False


# --- fixtures -----------------------------------------------------------------------------
@pytest.fixture
def limits(settings):
    settings.CHAT_MAX_MESSAGE_CHARS = MAX_CHARS
    # Frames are thrown faster than any rate a person may send (tests/test_flood.py has
    # the limits); the rule here is about each frame's answer.
    settings.CHAT_FRAME_RATE = 0


@pytest.fixture
def saved_conversation(alice):
    """Alice's conversation with a question and a completed answer (and its usage)."""
    conversation = Conversation.objects.create(owner=alice, title="Saved", model="test-model")
    at = timezone.now() - timedelta(minutes=5)
    Message.objects.create(conversation=conversation, role="user", content="Question?",
                           status="completed", created_at=at, completed_at=at)
    answer = Message.objects.create(
        conversation=conversation, role="assistant", content="Answer.", status="completed",
        model="test-model", finish_reason="stop", created_at=at + timedelta(seconds=1),
        completed_at=at + timedelta(seconds=1),
    )
    UsageRecord.objects.create(user=alice, conversation=conversation, message=answer,
                               model="test-model", status="completed", prompt_tokens=5,
                               completion_tokens=2, total_tokens=7)
    return conversation


def everything_saved() -> list:
    return [
        list(Conversation.objects.order_by("id").values()),
        list(Message.objects.order_by("id").values()),
        list(UsageRecord.objects.order_by("id").values()),
    ]


async def expect_state_after_sync(ws, conversation) -> dict:
    await ws.send({"type": "sync"})
    state = await ws.receive(timeout=5)
    assert state["type"] == "state", state
    assert state["conversation"]["id"] == str(conversation.id)
    assert [m["content"] for m in state["messages"]] == ["Question?", "Answer."]
    return state


# --- the fuzzer ---------------------------------------------------------------------------
# One socket per example; the fixtures (users, the saved conversation) are shared by the
# examples on purpose, hence the function-scoped-fixture health check is off.
@settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
          suppress_health_check=list(HealthCheck))
@given(frames=st.lists(bad_frames(), min_size=1, max_size=25))
async def test_no_bad_frame_closes_the_socket_each_gets_an_error_and_nothing_saved_changes(
    frames, alice, upstream, connect, limits, saved_conversation
):
    before = await sync_to_async(everything_saved)()
    _, _, ws = await connect(alice, saved_conversation.id)
    try:
        await ws.receive_type("state")
        # A flood: every frame is sent before any answer is read.
        for raw, _ in frames:
            # As daphne delivers frames (the communicator's send_to refuses empty ones).
            key = "bytes" if isinstance(raw, bytes) else "text"
            await ws.comm.send_input({"type": "websocket.receive", key: raw})
        for raw, codes in frames:
            answer = await ws.receive(timeout=5)
            assert answer["type"] == "error", (raw[:200], answer)
            assert answer["code"] in codes, (raw[:200], answer)
            assert answer["detail"]
        await expect_state_after_sync(ws, saved_conversation)
        assert await ws.comm.receive_nothing(timeout=0.01)
    finally:
        await ws.close()
    assert await sync_to_async(everything_saved)() == before


async def test_a_flood_of_bad_frames_is_answered_frame_by_frame(
    alice, upstream, connect, saved_conversation, settings
):
    settings.CHAT_FRAME_RATE = 0  # the frame rate limits: tests/test_flood.py
    before = await sync_to_async(everything_saved)()
    _, _, ws = await connect(alice, saved_conversation.id)
    await ws.receive_type("state")
    flood = ["[" * 50_000, '{"type": "message", "content": "\\udcff"}', "not json",
             '{"type": "edit", "content": "\\u0000"}'] * 100
    for raw in flood:
        await ws.send(raw)
    codes = [(await ws.receive(timeout=10))["code"] for _ in flood]
    assert codes == ["bad_json", "invalid", "bad_json", "empty"] * 100
    await expect_state_after_sync(ws, saved_conversation)
    assert await sync_to_async(everything_saved)() == before


async def test_a_failing_frame_handler_answers_internal_logs_once_and_the_socket_stays_usable(
    alice, upstream, connect, saved_conversation, monkeypatch, caplog
):
    # No known input reaches this path any more, so a failure is injected where a frame
    # handler reads the database (as a lost connection would fail it).
    _, _, ws = await connect(alice, saved_conversation.id)
    await ws.receive_type("state")

    async def broken_load_state(user, conversation_id):
        raise RuntimeError("database went away")

    monkeypatch.setattr(consumers, "_load_state", broken_load_state)
    caplog.set_level(logging.ERROR, logger="chat.consumers")
    await ws.send({"type": "sync"})
    error = await ws.receive()
    assert error["type"] == "error" and error["code"] == "internal" and error["detail"]
    assert "database went away" not in error["detail"]
    logged = [r for r in caplog.records if r.name == "chat.consumers"]
    assert len(logged) == 1 and logged[0].exc_info

    monkeypatch.undo()
    await expect_state_after_sync(ws, saved_conversation)


# --- a live daphne socket -----------------------------------------------------------------
async def test_frames_that_closed_a_live_socket_with_1011_get_an_error_instead(
    alice, upstream, asgi_server
):
    upstream.answer = "Answered."
    cookie = await sync_to_async(session_cookie)(alice)
    conversation = uuid.uuid4()
    async with websockets.connect(
        f"{asgi_server.ws_url}/ws/conversations/{conversation}/",
        additional_headers={"Cookie": cookie, "Origin": asgi_server.url},
        max_size=None,
    ) as ws:
        assert json.loads(await ws.recv())["type"] == "state"
        bad = [
            ("[" * 10_000 + "]" * 10_000, "bad_json"),
            (json.dumps({"type": "message", "content": "lone \udcff"}), "invalid"),
            (json.dumps({"type": "message", "content": "hi", "system_prompt": "\udcff"}),
             "invalid"),
            (json.dumps({"type": "edit", "content": "x\ud800"}), "invalid"),
        ]
        for raw, code in bad:
            await ws.send(raw)
            answer = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert (answer["type"], answer["code"]) == ("error", code), (raw[:60], answer)
        await ws.send(json.dumps({"type": "sync"}))
        state = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert state["type"] == "state" and state["conversation"] is None
        assert not await Conversation.objects.filter(id=conversation).aexists()

        # NUL is dropped, as the REST API does: the message is saved and answered.
        await ws.send(json.dumps({"type": "message", "content": "a\x00b"}))
        while (frame := json.loads(await asyncio.wait_for(ws.recv(), 20)))["type"] != (
            "generation.end"
        ):
            pass
        assert frame["status"] == "completed"
    saved = await Message.objects.aget(conversation_id=conversation, role="user")
    assert saved.content == "ab"
    assert "Traceback" not in asgi_server.log()
