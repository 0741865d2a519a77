"""The chat WebSocket against a real loopback upstream: streaming, stopping, failing.

Each test drives the real ASGI application (origin check, session auth, routing,
channel layer) and the real openai SDK talking HTTP to ``UpstreamServer``.
"""

import asyncio
import json
import time
import uuid

import pytest
from asgiref.sync import sync_to_async

from chat.models import Conversation, Message, UsageRecord
from tests.conftest import session_cookie
from tests.eventually import eventually

pytestmark = pytest.mark.django_db(transaction=True)

SHORT_ANSWER = "Hello! Streaming works, and this answer is short."


async def start_run(ws, content="Tell me about stopping generations"):
    """Send a message; return the assistant message id from generation.start."""
    await ws.send({"type": "message", "content": content})
    start = await ws.receive_type("generation.start")
    return start["message"]["id"]


async def open_tabs(connect, user, count, conversation_id=None):
    """``count`` sockets of ``user`` on one conversation, each past its state frame."""
    conversation_id = conversation_id or uuid.uuid4()
    tabs = []
    for _ in range(count):
        _, _, ws = await connect(user, conversation_id)
        await ws.receive_type("state")
        tabs.append(ws)
    return tabs


async def receive_deltas(ws, count):
    while len(ws.deltas()) < count:
        await ws.receive()


async def saved(message_id):
    return await Message.objects.aget(id=message_id)


async def usage_of(message_id):
    return await UsageRecord.objects.filter(message_id=message_id).afirst()


# --- stopping -------------------------------------------------------------------------
async def test_stop_closes_upstream_stream(alice, upstream, connect):
    _, _, ws = await connect(alice)
    await ws.receive_type("state")
    message_id = await start_run(ws)
    await receive_deltas(ws, 3)

    stopped_at = time.monotonic()
    await ws.send({"type": "stop"})
    end = await ws.receive_type("generation.end")

    request = upstream.requests[-1]
    assert await upstream.until(lambda: request.client_closed_at is not None, timeout=1.0)
    assert request.client_closed_at - stopped_at < 1.0
    assert not request.completed
    assert end["status"] == "cancelled"
    assert end["finish_reason"] == "cancelled"
    assert end["usage"]["estimated"] is True
    message = await saved(message_id)
    assert message.status == Message.Status.CANCELLED
    assert message.content == ws.text(message_id) != ""
    usage = await usage_of(message_id)
    assert usage.estimated and usage.status == "cancelled"
    assert usage.completion_tokens > 0 and usage.prompt_tokens > 0


async def test_a_stop_reaches_the_provider_one_loop_pass_after_the_frame_arrives(
    alice, upstream, connect
):
    # On a worker busy with hundreds of streams a loop pass takes tens of ms: the stop
    # frame must be handled in the pass after it arrives, and hang the provider up
    # there, not a few passes later when the run's task is scheduled.
    _, _, ws = await connect(alice)
    await ws.receive_type("state")
    await start_run(ws)
    await receive_deltas(ws, 3)
    request = upstream.requests[-1]

    await ws.send({"type": "stop"})  # in the socket's queue, as daphne puts it
    await asyncio.sleep(0)  # one pass of the event loop: the consumer's, queued first
    time.sleep(0.5)  # noqa: ASYNC251 - blocks the loop on purpose: nothing else runs
    assert request.client_closed_at is not None
    end = await ws.receive_type("generation.end")
    assert end["status"] == "cancelled"


async def test_stop_is_not_queued_behind_other_sockets_session_loading(
        alice, upstream, connect):
    # Channels loads each new socket's session and user in its one thread-sensitive
    # thread; a burst of new tabs keeps it busy. A stop must not wait for that thread.
    _, _, ws = await connect(alice)
    await ws.receive_type("state")
    await start_run(ws)
    await receive_deltas(ws, 2)
    busy = asyncio.ensure_future(sync_to_async(time.sleep, thread_sensitive=True)(2.0))
    await asyncio.sleep(0.1)  # the thread is in the sleep now
    stopped_at = time.monotonic()
    await ws.send({"type": "stop"})
    request = upstream.requests[-1]
    assert await upstream.until(lambda: request.client_closed_at is not None, timeout=1.5)
    assert request.client_closed_at - stopped_at < 1.0
    await busy


async def test_a_new_socket_is_not_queued_behind_other_sockets_session_loading(
        alice, upstream, connect):
    # Its own session and user are loaded in the executor's threads, not in the one
    # thread that other sync work (a slow load, say) may hold.
    cookie = await sync_to_async(session_cookie)(alice)
    busy = asyncio.ensure_future(sync_to_async(time.sleep, thread_sensitive=True)(2.0))
    await asyncio.sleep(0.1)
    started = time.monotonic()
    connected, _, ws = await connect(cookie=cookie)
    assert connected
    await ws.receive_type("state")  # authenticated as alice: a stranger gets 4401
    await start_run(ws)
    await receive_deltas(ws, 1)
    assert time.monotonic() - started < 1.0
    await busy


async def test_upstream_stops_generating_after_stop(alice, upstream, connect):
    _, _, ws = await connect(alice)
    await ws.receive_type("state")
    await start_run(ws)
    await receive_deltas(ws, 2)
    await ws.send({"type": "stop"})
    await ws.receive_type("generation.end")
    request = upstream.requests[-1]
    await upstream.until(lambda: request.client_closed_at is not None, timeout=1.0)
    written = request.chunks_written
    await asyncio.sleep(0.3)
    assert request.chunks_written == written, "the provider kept generating after the stop"


async def test_disconnect_of_starting_socket_cancels_run(alice, upstream, connect):
    starter, watcher = await open_tabs(connect, alice, 2)
    message_id = await start_run(starter)
    await receive_deltas(starter, 3)

    closed_at = time.monotonic()
    await starter.close()

    request = upstream.requests[-1]
    assert await upstream.until(lambda: request.client_closed_at is not None, timeout=1.0)
    assert request.client_closed_at - closed_at < 1.0
    end = await watcher.receive_type("generation.end")
    assert end["status"] == "cancelled"
    message = await saved(message_id)
    assert message.status == Message.Status.CANCELLED
    # The watcher saw every delta the starter saw before closing, and the rest.
    assert message.content == watcher.text(message_id)
    assert (await usage_of(message_id)).estimated


async def test_disconnect_of_watching_socket_does_not_cancel_run(alice, upstream, connect):
    upstream.answer = SHORT_ANSWER
    starter, watcher = await open_tabs(connect, alice, 2)
    message_id = await start_run(starter)
    await watcher.close()
    end = await starter.receive_type("generation.end")
    assert end["status"] == "completed"
    assert (await saved(message_id)).content == SHORT_ANSWER


async def test_stop_from_second_socket_stops_run_started_by_first(alice, upstream, connect):
    first, second = await open_tabs(connect, alice, 2)
    message_id = await start_run(first)
    await receive_deltas(second, 3)

    stopped_at = time.monotonic()
    await second.send({"type": "stop"})

    request = upstream.requests[-1]
    assert await upstream.until(lambda: request.client_closed_at is not None, timeout=1.0)
    assert request.client_closed_at - stopped_at < 1.0
    end_first = await first.receive_type("generation.end")
    end_second = await second.receive_type("generation.end")
    assert end_first == end_second
    assert end_first["status"] == "cancelled"
    message = await saved(message_id)
    assert message.content == first.text(message_id) == second.text(message_id)
    assert (await usage_of(message_id)).estimated


async def test_cancel_while_waiting_for_upstream_headers_closes_connection(
    alice, upstream, connect
):
    # The provider is slow to answer: the task is inside create(), not reading the stream.
    upstream.response_delay = 5
    _, _, ws = await connect(alice)
    await ws.receive_type("state")
    message_id = await start_run(ws)
    assert await upstream.until(lambda: len(upstream.requests) == 1, timeout=2)
    await ws.send({"type": "stop"})
    end = await ws.receive_type("generation.end")
    request = upstream.requests[-1]
    assert await upstream.until(lambda: request.client_closed_at is not None, timeout=1.0)
    assert end["status"] == "cancelled"
    message = await saved(message_id)
    assert message.status == Message.Status.CANCELLED and message.content == ""
    usage = await usage_of(message_id)
    assert usage.estimated and usage.completion_tokens == 0 and usage.prompt_tokens > 0


async def test_server_teardown_without_disconnect_cancels_run(alice, upstream, connect):
    _, _, ws = await connect(alice)
    await ws.receive_type("state")
    message_id = await start_run(ws)
    await receive_deltas(ws, 2)
    # What a server does at shutdown: cancel the application, no websocket.disconnect.
    ws.comm.future.cancel()
    request = upstream.requests[-1]
    assert await upstream.until(lambda: request.client_closed_at is not None, timeout=1.0)
    async def ended():
        return (await saved(message_id)).status != Message.Status.STREAMING

    await eventually(ended)
    message = await saved(message_id)
    assert message.status == Message.Status.CANCELLED
    assert await usage_of(message_id) is not None


# --- completing -----------------------------------------------------------------------
async def test_completed_run_saves_answer_with_reported_usage(alice, upstream, connect):
    upstream.answer = SHORT_ANSWER
    _, _, ws = await connect(alice)
    await ws.receive_type("state")
    message_id = await start_run(ws, "Say hello")
    end = await ws.receive_type("generation.end")

    assert end["status"] == "completed"
    assert end["finish_reason"] == "stop"
    assert end["error"] is None
    assert ws.text(message_id) == SHORT_ANSWER
    message = await saved(message_id)
    assert message.status == Message.Status.COMPLETED
    assert message.content == SHORT_ANSWER
    assert message.finish_reason == "stop"
    usage = await usage_of(message_id)
    request = upstream.requests[-1]
    assert request.completed
    assert usage.estimated is False
    assert usage.completion_tokens == request.chunks_written
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert end["usage"]["completion_tokens"] == usage.completion_tokens
    assert usage.ttft_ms is not None and usage.duration_ms >= usage.ttft_ms


async def test_request_asks_for_streamed_usage_and_sends_history(alice, upstream, connect):
    upstream.answer = SHORT_ANSWER
    _, _, ws = await connect(alice)
    await ws.receive_type("state")
    await start_run(ws, "first question")
    await ws.receive_type("generation.end")
    await start_run(ws, "second question")
    await ws.receive_type("generation.end")
    body = upstream.requests[-1].body
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user"]
    assert body["messages"][-1]["content"] == "second question"
    assert body["messages"][2]["content"] == SHORT_ANSWER


async def test_answer_cut_by_max_tokens_reports_length(alice, upstream, connect, settings):
    settings.CHAT_MAX_TOKENS = 5
    _, _, ws = await connect(alice)
    await ws.receive_type("state")
    message_id = await start_run(ws)
    end = await ws.receive_type("generation.end")
    assert end["status"] == "completed"
    assert end["finish_reason"] == "length"
    assert (await usage_of(message_id)).completion_tokens == 5


async def test_conversation_is_created_by_first_message_with_a_title(alice, upstream, connect):
    upstream.answer = SHORT_ANSWER
    conversation_id = uuid.uuid4()
    _, _, ws = await connect(alice, conversation_id)
    state = await ws.receive_type("state")
    assert state["conversation"] is None and state["messages"] == []
    await ws.send({"type": "message", "content": "  How do I stop a model?  "})
    frame = await ws.receive_type("message")
    assert frame["message"]["role"] == "user"
    assert frame["message"]["content"] == "How do I stop a model?"
    assert frame["conversation"]["title"] == "How do I stop a model?"
    await ws.receive_type("generation.end")
    conversation = await Conversation.objects.aget(id=conversation_id)
    assert conversation.owner_id == alice.id
    assert await conversation.messages.acount() == 2


# --- fan-out and catching up ----------------------------------------------------------
async def test_two_sockets_receive_every_delta_in_seq_order(alice, upstream, connect):
    upstream.answer = "one two three four five six seven eight nine ten " * 3
    first, second = await open_tabs(connect, alice, 2)
    message_id = await start_run(first)
    await first.receive_type("generation.end")
    await second.receive_type("generation.end")
    for ws in (first, second):
        seqs = [d["seq"] for d in ws.deltas(message_id)]
        assert seqs == list(range(1, len(seqs) + 1))
        assert ws.text(message_id) == upstream.answer
    # Deltas are coalesced: fewer frames than upstream chunks is allowed, never more.
    assert len(first.deltas(message_id)) <= upstream.requests[-1].chunks_written


async def test_tab_opened_mid_stream_catches_up_from_state(alice, upstream, connect):
    upstream.answer = " ".join(f"word{i}" for i in range(1000))
    conversation_id = uuid.uuid4()
    _, _, first = await connect(alice, conversation_id)
    await first.receive_type("state")
    message_id = await start_run(first)
    await receive_deltas(first, 5)

    _, _, late = await connect(alice, conversation_id)
    state = await late.receive_type("state")
    generation = state["generation"]
    assert generation["message_id"] == message_id
    assert generation["seq"] >= 5
    assert generation["content"]
    streaming = [m for m in state["messages"] if m["id"] == message_id][0]
    assert streaming["status"] == "streaming"
    assert streaming["content"] == generation["content"]

    await receive_deltas(late, 5)
    await late.send({"type": "stop"})
    await late.receive_type("generation.end")
    later = late.deltas(message_id)
    assert [d["seq"] for d in later] == list(
        range(generation["seq"] + 1, generation["seq"] + 1 + len(later))
    )
    message = await saved(message_id)
    assert generation["content"] + late.text(message_id) == message.content
    await first.receive_type("generation.end")
    assert first.text(message_id) == message.content


async def test_streaming_answer_is_checkpointed_before_it_ends(alice, upstream, connect):
    _, _, ws = await connect(alice)
    await ws.receive_type("state")
    message_id = await start_run(ws)
    await receive_deltas(ws, 20)  # ~0.4 s at 50 tokens/s; checkpoints every 0.2 s here
    async def checkpointed():
        return (await saved(message_id)).content

    await eventually(checkpointed, timeout=2.5)
    message = await saved(message_id)
    assert message.status == Message.Status.STREAMING
    assert message.content and upstream.answer  # partial text is in the database
    assert ws.text(message_id).startswith(message.content)
    await ws.send({"type": "stop"})
    await ws.receive_type("generation.end")


# --- failures -------------------------------------------------------------------------
async def test_upstream_http_500_ends_run_as_failed(alice, upstream, connect):
    upstream.fail_status = 500
    _, _, ws = await connect(alice)
    await ws.receive_type("state")
    message_id = await start_run(ws)
    end = await ws.receive_type("generation.end")
    assert end["status"] == "failed"
    assert end["finish_reason"] == "error"
    assert "HTTP 500" in end["error"]
    message = await saved(message_id)
    assert message.status == Message.Status.FAILED and "HTTP 500" in message.error
    usage = await usage_of(message_id)
    assert usage.status == "failed" and usage.estimated and usage.completion_tokens == 0


async def test_connection_dropped_mid_stream_keeps_partial_text(alice, upstream, connect):
    upstream.drop_after = 8
    _, _, ws = await connect(alice)
    await ws.receive_type("state")
    message_id = await start_run(ws)
    end = await ws.receive_type("generation.end")
    assert end["status"] == "failed"
    assert "connection" in end["error"].lower()
    message = await saved(message_id)
    assert message.status == Message.Status.FAILED
    assert message.content == "".join(upstream.requests[-1].text_written)
    assert message.content == ws.text(message_id) != ""
    usage = await usage_of(message_id)
    assert usage.estimated and usage.completion_tokens > 0


async def test_failed_run_leaves_conversation_usable(alice, upstream, connect):
    upstream.fail_status = 500
    _, _, ws = await connect(alice)
    await ws.receive_type("state")
    await start_run(ws)
    await ws.receive_type("generation.end")
    upstream.fail_status = None
    upstream.answer = SHORT_ANSWER
    message_id = await start_run(ws, "try again")
    end = await ws.receive_type("generation.end")
    assert end["status"] == "completed"
    assert ws.text(message_id) == SHORT_ANSWER


# --- access ---------------------------------------------------------------------------
async def test_anonymous_socket_is_closed_with_4401(connect, db):
    connected, _, ws = await connect(None)
    assert connected
    closed = await ws.comm.receive_output(timeout=2)
    assert closed == {"type": "websocket.close", "code": 4401}


async def test_bob_cannot_connect_to_alices_conversation(alice, bob, upstream, connect):
    upstream.answer = SHORT_ANSWER
    conversation_id = uuid.uuid4()
    _, _, ws = await connect(alice, conversation_id)
    await ws.receive_type("state")
    await start_run(ws, "alice's secret")
    await ws.receive_type("generation.end")

    connected, _, intruder = await connect(bob, conversation_id)
    closed = await intruder.comm.receive_output(timeout=2)
    assert closed == {"type": "websocket.close", "code": 4403}


async def test_bob_does_not_receive_alices_deltas(alice, bob, upstream, connect):
    conversation_id = uuid.uuid4()
    _, _, ws = await connect(alice, conversation_id)
    await ws.receive_type("state")
    await start_run(ws, "alice's question")
    _, _, intruder = await connect(bob, conversation_id)
    closed = await intruder.comm.receive_output(timeout=2)
    assert closed["type"] == "websocket.close"
    assert await intruder.comm.receive_nothing(timeout=0.3)
    await ws.send({"type": "stop"})
    await ws.receive_type("generation.end")


async def test_bob_cannot_claim_an_id_alice_created_meanwhile(alice, bob, upstream, connect):
    upstream.answer = SHORT_ANSWER
    conversation_id = uuid.uuid4()
    _, _, bobs = await connect(bob, conversation_id)  # connected before it existed
    await bobs.receive_type("state")
    _, _, alices = await connect(alice, conversation_id)
    await alices.receive_type("state")
    await start_run(alices, "alice first")
    await alices.receive_type("generation.end")
    await bobs.send({"type": "message", "content": "bob's message"})
    error = await bobs.receive_type("error")
    assert error["code"] == "forbidden"
    assert await Message.objects.filter(content="bob's message").acount() == 0


# --- bad input ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "frame, code",
    [
        ("not json", "bad_json"),
        ("[1, 2]", "bad_frame"),
        ('{"content": "no type"}', "bad_frame"),
        ('{"type": "dance"}', "unknown_type"),
        ('{"type": "message"}', "empty"),
        ('{"type": "message", "content": "   "}', "empty"),
        ('{"type": "message", "content": 42}', "empty"),
        ('{"type": "message", "content": "hi", "model": 7}', "bad_frame"),
        ('{"type": "message", "content": "hi", "model": "no-such-model"}', "invalid"),
    ],
)
async def test_bad_frame_gets_error_frame_and_socket_stays_usable(
    alice, upstream, connect, frame, code
):
    upstream.answer = SHORT_ANSWER
    _, _, ws = await connect(alice)
    await ws.receive_type("state")
    await ws.send(frame)
    error = await ws.receive()
    assert error["type"] == "error" and error["code"] == code and error["detail"]
    message_id = await start_run(ws, "still works?")
    end = await ws.receive_type("generation.end")
    assert end["status"] == "completed" and ws.text(message_id) == SHORT_ANSWER


async def test_too_large_message_is_refused_and_nothing_saved(alice, connect, settings, db):
    settings.CHAT_MAX_MESSAGE_CHARS = 100
    _, _, ws = await connect(alice)
    await ws.receive_type("state")
    await ws.send({"type": "message", "content": "x" * 101})
    error = await ws.receive()
    assert error["code"] == "too_large"
    assert await Message.objects.acount() == 0


async def test_second_message_while_running_is_busy(alice, upstream, connect):
    first, second = await open_tabs(connect, alice, 2)
    message_id = await start_run(first)
    await second.send({"type": "message", "content": "me too"})
    error = await second.receive_type("error")
    assert error["code"] == "busy"
    assert await Message.objects.filter(content="me too").acount() == 0
    # The first run's request is out (a stop can now land before it is sent).
    assert await upstream.until(lambda: len(upstream.requests) == 1)
    await first.send({"type": "stop"})
    await first.receive_type("generation.end")
    assert (await saved(message_id)).status == Message.Status.CANCELLED
    assert len(upstream.requests) == 1


async def test_stop_when_nothing_runs_is_harmless(alice, upstream, connect):
    upstream.answer = SHORT_ANSWER
    _, _, ws = await connect(alice)
    await ws.receive_type("state")
    await ws.send({"type": "stop"})
    assert await ws.comm.receive_nothing(timeout=0.2)
    await start_run(ws)
    assert (await ws.receive_type("generation.end"))["status"] == "completed"


# --- regenerate and edit --------------------------------------------------------------
async def test_regenerate_supersedes_the_previous_answer(alice, upstream, connect):
    upstream.answer = "first answer"
    conversation_id = uuid.uuid4()
    _, _, ws = await connect(alice, conversation_id)
    await ws.receive_type("state")
    old_id = await start_run(ws, "question")
    await ws.receive_type("generation.end")
    upstream.answer = "second answer"
    await ws.send({"type": "regenerate"})
    new_id = (await ws.receive_type("generation.start"))["message"]["id"]
    await ws.receive_type("generation.end")
    old, new = await saved(old_id), await saved(new_id)
    assert old.superseded and not new.superseded
    assert new.content == "second answer"
    # The model is not shown the superseded answer.
    assert [m["content"] for m in upstream.requests[-1].body["messages"][1:]] == ["question"]
    _, _, again = await connect(alice, conversation_id)
    state = await again.receive_type("state")
    assert [m["content"] for m in state["messages"]] == ["question", "second answer"]


async def test_edit_replaces_the_last_user_message(alice, upstream, connect):
    upstream.answer = "answer"
    conversation_id = uuid.uuid4()
    _, _, ws = await connect(alice, conversation_id)
    await ws.receive_type("state")
    await start_run(ws, "questoin with typo")
    await ws.receive_type("generation.end")
    await ws.send({"type": "edit", "content": "question fixed"})
    await ws.receive_type("generation.end")
    _, _, again = await connect(alice, conversation_id)
    state = await again.receive_type("state")
    assert [m["content"] for m in state["messages"]] == ["question fixed", "answer"]
    assert await Message.objects.filter(superseded=True).acount() == 2


async def test_two_tabs_sending_first_message_at_once_start_one_run(alice, upstream, connect):
    first, second = await open_tabs(connect, alice, 2)
    await asyncio.gather(
        first.send({"type": "message", "content": "from tab one"}),
        second.send({"type": "message", "content": "from tab two"}),
    )
    frames = [await first.receive_until(lambda f: f["type"] in ("generation.start", "error")),
              await second.receive_until(lambda f: f["type"] in ("generation.start", "error"))]
    errors = [f for f in frames if f["type"] == "error"]
    # Either both frames are the one generation.start (the winner's broadcast reached
    # both tabs first) or one tab got busy; never two runs.
    assert all(e["code"] == "busy" for e in errors)
    await first.send({"type": "stop"})
    await first.receive_type("generation.end")
    assert await Message.objects.filter(role="assistant").acount() == 1
    assert await Conversation.objects.acount() == 1
    # The stop may even beat the request to the provider; there is never a second one.
    assert len(upstream.requests) <= 1


async def test_a_frame_the_fast_encoder_refuses_still_goes_out_as_json():
    from chat.consumers import ChatConsumer

    for frame in ({"type": "delta", "content": "héllo ✓"},
                  {"type": "delta", "content": "lone \udcff surrogate"},
                  {"type": "state", "seq": 2**70}):
        assert json.loads(await ChatConsumer.encode_json(frame)) == frame
