"""The loopback upstream speaks OpenAI's Responses API (chat.demo_responses), and
chat.generation.responses_events reads it.

The dialect is driven with a raw HTTP client (httpx2), the way a provider would use it:
typed events with increasing sequence numbers, reasoning summaries, usage, a foreground
stream that stops generating when closed, a background one that goes on until
cancelled, cancel with the usage of what was generated, ``starting_after`` resume, 400
for background without store, and the faults. The parser is checked on hand-written
events (OpenAI's and llama.cpp's shapes) and on the loopback's own stream.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import httpx2
import pytest

from chat.demo_model import UpstreamServer, split_tokens
from chat.demo_responses import UNKNOWN_EVENT_TYPE
from chat.generation import responses_events as rev
from tests.eventually import eventually

ANSWER = " ".join(f"word{i}" for i in range(12))
TOKENS = split_tokens(ANSWER)
LONG_ANSWER = " ".join(f"token{i}" for i in range(60))
REASONING_TOKENS = 4

MESSAGE_EVENTS = [
    "response.output_item.added", "response.content_part.added",
    *["response.output_text.delta"] * len(TOKENS),
    "response.output_text.done", "response.content_part.done",
    "response.output_item.done",
]
SUMMARY_EVENTS = [
    "response.output_item.added", "response.reasoning_summary_part.added",
    *["response.reasoning_summary_text.delta"] * REASONING_TOKENS,
    "response.reasoning_summary_text.done", "response.reasoning_summary_part.done",
    "response.output_item.done",
]


@dataclass
class Sse:
    """One server-sent event as received: its ``event:`` name, raw data, parsed data
    (None when the data is not JSON)."""

    name: str | None
    raw: str
    data: dict | None

    @property
    def type(self) -> str | None:
        return self.data.get("type") if self.data else None


async def iter_events(response):
    """Yield the events of a streamed response one by one, as they come (``data`` None
    for one that is not JSON); a stream cut before its end just stops."""
    name = None
    async for line in response.aiter_lines():
        if line.startswith("event:"):
            name = line[len("event:"):].strip()
        elif line.startswith("data:"):
            raw = line[len("data:"):].strip()
            try:
                data = json.loads(raw)
            except ValueError:
                data = None
            yield Sse(name, raw, data)
        elif not line:
            name = None


async def read_events(response, until=None) -> list[Sse]:
    """The events of a streamed response, up to the first one ``until`` accepts."""
    events: list[Sse] = []
    async for event in iter_events(response):
        events.append(event)
        if until is not None and until(event):
            break
    return events


def body(**fields) -> dict:
    return {"model": "gpt-4.1-mini", "input": "Tell me about streaming", "store": False,
            "stream": True, **fields}


def text_of(events: list[Sse]) -> str:
    return "".join(e.data["delta"] for e in events if e.type == "response.output_text.delta")


def nth_delta(n: int):
    """``until`` for read_events: stop at the n-th text delta."""
    seen = []

    def until(event: Sse) -> bool:
        if event.type == "response.output_text.delta":
            seen.append(event)
        return len(seen) >= n
    return until


@pytest.fixture
async def upstream():
    """The loopback upstream in the responses dialect, on this test's event loop, and a
    raw HTTP client of it (no proxy from the environment)."""
    server = await UpstreamServer(dialect="responses", tokens_per_second=200,
                                  answer=ANSWER, reasoning_tokens=REASONING_TOKENS,
                                  cached_tokens=2).start()
    async with httpx2.AsyncClient(base_url=server.base_url, timeout=10,
                                  trust_env=False) as client:
        yield server, client
    await server.stop()


# --- the stream -------------------------------------------------------------------------
async def test_a_streamed_answer_sends_each_event_type_in_order_with_increasing_numbers(
        upstream):
    server, client = upstream
    async with client.stream("POST", "/responses", json=body()) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        events = await read_events(response)

    assert [e.type for e in events] == [
        "response.created", "response.in_progress", *MESSAGE_EVENTS, "response.completed"]
    assert [e.data["sequence_number"] for e in events] == list(range(len(events)))
    assert all(e.name == e.type for e in events)
    assert text_of(events) == ANSWER
    created, final = events[0].data["response"], events[-1].data["response"]
    assert created["id"].startswith("resp_") and created["status"] == "in_progress"
    assert created["usage"] is None
    assert final["id"] == created["id"] and final["status"] == "completed"
    assert final["output"][0]["content"][0] == {"type": "output_text", "annotations": [],
                                                "text": ANSWER}
    prompt = server.responses.last.prompt_tokens
    assert final["usage"] == {
        "input_tokens": prompt, "input_tokens_details": {"cached_tokens": 2},
        "output_tokens": len(TOKENS), "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + len(TOKENS)}
    assert server.responses.last.billed == final["usage"]
    delta = next(e.data for e in events if e.type == "response.output_text.delta")
    assert set(delta) >= {"type", "sequence_number", "item_id", "output_index",
                          "content_index", "delta"}
    assert server.responses.posts == 1


async def test_a_reasoning_model_streams_its_summary_before_the_answer(upstream):
    server, client = upstream
    async with client.stream("POST", "/responses", json=body(
            model="o4-mini", reasoning={"summary": "auto"})) as response:
        events = await read_events(response)

    assert [e.type for e in events] == [
        "response.created", "response.in_progress", *SUMMARY_EVENTS, *MESSAGE_EVENTS,
        "response.completed"]
    summary = "".join(e.data["delta"] for e in events
                      if e.type == "response.reasoning_summary_text.delta")
    assert summary == "".join(server.responses.last.record.reasoning_written)
    done = next(e.data for e in events if e.type == "response.reasoning_summary_text.done")
    assert done["text"] == summary and done["summary_index"] == 0
    usage = events[-1].data["response"]["usage"]
    assert usage["output_tokens_details"] == {"reasoning_tokens": REASONING_TOKENS}
    assert usage["output_tokens"] == REASONING_TOKENS + len(TOKENS)


async def test_a_reasoning_model_without_a_summary_bills_its_hidden_reasoning(upstream):
    server, client = upstream
    async with client.stream("POST", "/responses",
                             json=body(model="demo-reasoning")) as response:
        events = await read_events(response)

    assert not [e for e in events if "reasoning_summary" in e.type]
    assert events[2].data["item"]["type"] == "reasoning"
    assert text_of(events) == ANSWER
    assert events[-1].data["response"]["usage"]["output_tokens_details"] == {
        "reasoning_tokens": REASONING_TOKENS}


async def test_max_output_tokens_ends_the_answer_with_response_incomplete(upstream):
    server, client = upstream
    async with client.stream("POST", "/responses",
                             json=body(max_output_tokens=5)) as response:
        events = await read_events(response)

    final = events[-1]
    assert final.type == "response.incomplete"
    assert final.data["response"]["status"] == "incomplete"
    assert final.data["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final.data["response"]["usage"]["output_tokens"] == 5
    assert text_of(events) == "".join(TOKENS[:5])


async def test_a_response_without_streaming_answers_the_finished_response(upstream):
    server, client = upstream
    reply = await client.post("/responses", json=body(stream=False))

    assert reply.status_code == 200
    response = reply.json()
    assert response["status"] == "completed"
    assert response["output"][0]["content"][0]["text"] == ANSWER
    assert response["usage"]["output_tokens"] == len(TOKENS)


# --- stop: foreground and background ----------------------------------------------------
async def test_closing_a_foreground_stream_stops_generation(upstream):
    server, client = upstream
    server.answer, server.tokens_per_second = LONG_ANSWER, 50
    async with client.stream("POST", "/responses", json=body()) as response:
        await read_events(response, until=nth_delta(3))
    run = server.responses.last

    assert await eventually(lambda: run.task.done())
    assert run.record.client_closed_at is not None
    assert run.status == "cancelled"
    generated = len(run.record.text_written)
    assert 3 <= generated < len(split_tokens(LONG_ANSWER))
    assert run.billed["output_tokens"] == generated
    assert run.record.chunks_written <= generated


async def test_a_background_response_keeps_generating_after_its_stream_closes(upstream):
    server, client = upstream
    server.answer, server.tokens_per_second = LONG_ANSWER, 100
    async with client.stream("POST", "/responses",
                             json=body(background=True, store=True)) as response:
        events = await read_events(response, until=nth_delta(3))
    run = server.responses.last
    assert events[0].data["response"]["status"] == "queued"
    assert [e.type for e in events[:3]] == [
        "response.created", "response.queued", "response.in_progress"]

    assert await eventually(lambda: run.status == "completed", timeout=10)
    assert run.record.client_closed_at < run.record.finished_at
    assert "".join(run.record.text_written) == LONG_ANSWER
    retrieved = (await client.get(f"/responses/{run.id}")).json()
    assert retrieved["status"] == "completed"
    assert retrieved["usage"] == run.billed
    assert server.responses.gets == 1


async def test_cancel_stops_a_background_response_and_returns_the_usage_it_generated(
        upstream):
    server, client = upstream
    server.answer, server.tokens_per_second = LONG_ANSWER, 50
    async with client.stream("POST", "/responses",
                             json=body(background=True, store=True)) as response:
        await read_events(response, until=nth_delta(3))
    run = server.responses.last

    reply = await client.post(f"/responses/{run.id}/cancel")

    assert reply.status_code == 200
    cancelled = reply.json()
    assert cancelled["status"] == "cancelled"
    assert await eventually(lambda: run.task.done())
    generated = len(run.record.text_written)
    assert 3 <= generated < len(split_tokens(LONG_ANSWER))
    assert cancelled["usage"] == run.billed
    assert cancelled["usage"]["output_tokens"] == generated
    # Cancelling again answers the same response (idempotent); so does a retrieve.
    again = await client.post(f"/responses/{run.id}/cancel")
    assert again.json()["usage"] == cancelled["usage"]
    assert (await client.get(f"/responses/{run.id}")).json()["status"] == "cancelled"
    assert server.responses.calls["POST /responses/{id}/cancel"] == 2


async def test_cancel_refuses_a_foreground_response_and_an_unknown_id(upstream):
    server, client = upstream
    await client.post("/responses", json=body(stream=False, store=True))
    run = server.responses.last

    refused = await client.post(f"/responses/{run.id}/cancel")
    unknown = await client.post("/responses/resp_nothing/cancel")

    assert refused.status_code == 400
    assert "background" in refused.json()["error"]["message"]
    assert unknown.status_code == 404


async def test_background_without_store_is_refused_with_400(upstream):
    server, client = upstream
    reply = await client.post("/responses", json=body(background=True, store=False))

    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "store"
    assert not server.responses.runs


async def test_a_response_stored_false_cannot_be_retrieved(upstream):
    server, client = upstream
    await client.post("/responses", json=body(stream=False))
    run = server.responses.last

    assert (await client.get(f"/responses/{run.id}")).status_code == 404


async def test_a_background_response_without_streaming_answers_queued_and_finishes(upstream):
    server, client = upstream
    reply = await client.post("/responses", json=body(stream=False, background=True,
                                                      store=True))
    assert reply.json()["status"] == "queued"
    run = server.responses.last

    assert await eventually(lambda: run.status == "completed")
    assert (await client.get(f"/responses/{run.id}")).json()["usage"]["output_tokens"] == len(
        TOKENS)


# --- resume -----------------------------------------------------------------------------
async def test_starting_after_replays_exactly_the_events_after_n(upstream):
    server, client = upstream
    async with client.stream("POST", "/responses",
                             json=body(background=True, store=True)) as response:
        original = await read_events(response)
    run = server.responses.last

    async with client.stream("GET", f"/responses/{run.id}",
                             params={"stream": "true", "starting_after": "5"}) as response:
        replayed = await read_events(response)

    assert [e.raw for e in replayed] == [e.raw for e in original[6:]]
    assert replayed[0].data["sequence_number"] == 6


async def test_a_cut_background_stream_resumes_with_every_delta_once_and_one_post(upstream):
    server, client = upstream
    server.tokens_per_second = 50
    server.responses.fault = "drop_mid_stream"
    received: list[Sse] = []
    with pytest.raises(httpx2.HTTPError):
        async with client.stream("POST", "/responses",
                                 json=body(background=True, store=True)) as response:
            async for event in iter_events(response):
                received.append(event)
    run = server.responses.last
    assert run.follows[0].dropped and text_of(received) == "".join(TOKENS[:3])
    last = received[-1].data["sequence_number"]

    async with client.stream("GET", f"/responses/{run.id}", params={
            "stream": "true", "starting_after": str(last)}) as response:
        resumed = await read_events(response)

    numbers = [e.data["sequence_number"] for e in received + resumed]
    assert numbers == list(range(len(numbers)))
    assert text_of(received + resumed) == ANSWER
    assert resumed[-1].type == "response.completed"
    assert (server.responses.posts, server.responses.gets) == (1, 1)


async def test_a_foreground_response_cannot_be_streamed_again(upstream):
    server, client = upstream
    await client.post("/responses", json=body(stream=False, store=True))
    run = server.responses.last

    reply = await client.get(f"/responses/{run.id}", params={"stream": "true"})

    assert reply.status_code == 400


# --- faults -----------------------------------------------------------------------------
async def test_a_response_failed_fault_ends_the_stream_with_the_error(upstream):
    server, client = upstream
    server.responses.fault = "response_failed"
    async with client.stream("POST", "/responses", json=body()) as response:
        events = await read_events(response)

    final = events[-1]
    assert final.type == "response.failed"
    assert final.data["response"]["status"] == "failed"
    assert final.data["response"]["error"]["message"].startswith("The model failed")
    assert text_of(events) == "".join(TOKENS[:3])
    assert not [e for e in events if e.type == "response.completed"]


async def test_an_error_event_fault_ends_the_stream_with_an_error_event(upstream):
    server, client = upstream
    server.responses.fault = "error_event"
    async with client.stream("POST", "/responses", json=body()) as response:
        events = await read_events(response)

    assert events[-1].type == "error"
    assert set(events[-1].data) == {"type", "sequence_number", "code", "message", "param"}
    assert server.responses.last.status == "failed"


async def test_a_malformed_event_fault_sends_data_that_is_not_json(upstream):
    server, client = upstream
    server.responses.fault = "malformed_event"
    async with client.stream("POST", "/responses", json=body()) as response:
        events = await read_events(response)

    broken = [e for e in events if e.data is None]
    assert len(broken) == 1
    numbered = [e for e in events if e.data is not None]
    assert [e.data["sequence_number"] for e in numbered] == list(range(len(numbered)))
    assert numbered[-1].type == "response.completed"


async def test_an_unknown_event_type_fault_sends_a_numbered_event_of_an_unknown_type(
        upstream):
    server, client = upstream
    server.responses.fault = "unknown_event"
    async with client.stream("POST", "/responses", json=body()) as response:
        events = await read_events(response)

    assert [e.type for e in events].count(UNKNOWN_EVENT_TYPE) == 1
    assert [e.data["sequence_number"] for e in events] == list(range(len(events)))
    assert text_of(events) == ANSWER


async def test_a_cut_foreground_stream_stops_generation(upstream):
    server, client = upstream
    server.answer, server.tokens_per_second = LONG_ANSWER, 50
    server.responses.fault = "drop_mid_stream"
    with pytest.raises(httpx2.HTTPError):
        async with client.stream("POST", "/responses", json=body()) as response:
            await read_events(response)
    run = server.responses.last

    assert await eventually(lambda: run.task.done())
    assert run.status == "cancelled"
    assert len(run.record.text_written) < len(split_tokens(LONG_ANSWER))


async def test_http_error_faults_apply_to_the_responses_endpoint(upstream):
    server, client = upstream
    server.fault = "rate_limited"

    reply = await client.post("/responses", json=body())

    assert reply.status_code == 429
    assert reply.headers["retry-after"] == "1"


def test_an_unknown_responses_fault_is_refused():
    with pytest.raises(ValueError):
        UpstreamServer(dialect="responses").responses.fault = "nope"


# --- the parser (chat.generation.responses_events) -------------------------------------
USAGE = {"input_tokens": 30, "input_tokens_details": {"cached_tokens": 12},
         "output_tokens": 50, "output_tokens_details": {"reasoning_tokens": 20},
         "total_tokens": 80}


def response(status: str, **fields) -> dict:
    return {"id": "resp_1", "object": "response", "status": status, **fields}


def test_text_and_refusal_deltas_are_text():
    text = rev.parse_event({"type": "response.output_text.delta", "sequence_number": 7,
                            "item_id": "msg_1", "output_index": 0, "content_index": 0,
                            "delta": "Hello"})
    refusal = rev.parse_event({"type": "response.refusal.delta", "sequence_number": 8,
                               "delta": "I can't help with that."})

    assert (text.kind, text.value, text.sequence_number) == ("text", "Hello", 7)
    assert (refusal.kind, refusal.value) == ("text", "I can't help with that.")


def test_reasoning_summary_and_reasoning_text_deltas_are_reasoning():
    summary = rev.parse_event({"type": "response.reasoning_summary_text.delta",
                               "sequence_number": 3, "summary_index": 0, "delta": "Hmm"})
    raw = rev.parse_event({"type": "response.reasoning_text.delta", "delta": "think"})
    second_part = rev.parse_event({"type": "response.reasoning_summary_part.added",
                                   "summary_index": 1, "part": {"type": "summary_text"}})
    first_part = rev.parse_event({"type": "response.reasoning_summary_part.added",
                                  "summary_index": 0})

    assert (summary.kind, summary.value) == ("reasoning", "Hmm")
    assert (raw.kind, raw.value, raw.sequence_number) == ("reasoning", "think", None)
    assert (second_part.kind, second_part.value) == ("reasoning", "\n\n")
    assert first_part.kind == "ignored"


def test_created_gives_the_response_id():
    event = rev.parse_event({"type": "response.created", "sequence_number": 0,
                             "response": response("in_progress")})

    assert (event.kind, event.value, event.response_id) == ("started", "resp_1", "resp_1")


def test_completed_finishes_with_stop_and_the_usage_mapped():
    event = rev.parse_event({"type": "response.completed", "sequence_number": 40,
                             "response": response("completed", usage=USAGE)})

    assert event.kind == "finish"
    assert event.value == rev.Finish("completed", "stop", {
        "prompt_tokens": 30, "completion_tokens": 50, "reasoning_tokens": 20,
        "cached_tokens": 12})


@pytest.mark.parametrize("reason, finish_reason", [
    ("max_output_tokens", "length"), ("content_filter", "content_filter"),
    (None, "length")])
def test_incomplete_finishes_with_the_reason_mapped(reason, finish_reason):
    event = rev.parse_event({"type": "response.incomplete", "response": response(
        "incomplete", incomplete_details={"reason": reason} if reason else None)})

    assert (event.kind, event.value.finish_reason) == ("finish", finish_reason)


def test_failed_and_error_events_are_failures_with_the_providers_words():
    failed = rev.parse_event({"type": "response.failed", "response": response(
        "failed", error={"code": "server_error", "message": "The model crashed."},
        usage=USAGE)})
    error = rev.parse_event({"type": "error", "sequence_number": 9, "code": "overloaded",
                             "message": "Too busy.", "param": None})
    silent = rev.parse_event({"type": "response.failed", "response": response("failed")})

    assert failed.kind == "failed" and failed.value.message == "The model crashed."
    assert failed.value.code == "server_error"
    assert failed.value.usage["completion_tokens"] == 50
    assert (error.kind, error.value.message, error.value.code) == (
        "failed", "Too busy.", "overloaded")
    assert silent.value.message == rev.FAILED_MESSAGE


def test_unknown_and_bookkeeping_events_are_ignored():
    for kind in (UNKNOWN_EVENT_TYPE, "response.output_item.added",
                 "response.output_text.done", "response.content_part.done"):
        assert rev.parse_event({"type": kind, "sequence_number": 1}).kind == "ignored"


@pytest.mark.parametrize("data", [
    None, [], "text", {}, {"type": 3},
    {"type": "response.output_text.delta", "delta": None},
    {"type": "response.output_text.delta", "delta": {"text": "x"}}])
def test_malformed_events_are_reported_not_raised(data):
    assert rev.parse_event(data).kind == "malformed"


def test_llama_cpp_usage_without_details_maps_to_zero_reasoning_and_cache():
    assert rev.map_usage({"input_tokens": 9, "output_tokens": 4, "total_tokens": 13}) == {
        "prompt_tokens": 9, "completion_tokens": 4, "reasoning_tokens": 0,
        "cached_tokens": 0}
    assert rev.map_usage({"input_tokens": -1, "output_tokens": True}) == {
        "prompt_tokens": 0, "completion_tokens": 0, "reasoning_tokens": 0,
        "cached_tokens": 0}
    assert rev.map_usage(None) is None and rev.map_usage({}) is None


def test_a_cancel_reply_gives_its_usage_as_a_cancelled_finish():
    outcome = rev.response_outcome(response("cancelled", usage=USAGE))
    running = rev.response_outcome(response("in_progress"))

    assert outcome == rev.Finish("cancelled", "cancelled", rev.map_usage(USAGE))
    assert running is None


def test_the_cursor_drops_replayed_events_and_gives_the_resume_point():
    cursor = rev.EventCursor()
    first = [{"type": "response.created", "sequence_number": 0,
              "response": response("in_progress")},
             {"type": "response.output_text.delta", "sequence_number": 1, "delta": "a"}]
    replay = [{"type": "response.output_text.delta", "sequence_number": 1, "delta": "a"},
              {"type": "response.output_text.delta", "sequence_number": 2, "delta": "b"}]

    fed = [cursor.feed(d) for d in first + replay]

    assert [e.value if e else None for e in fed] == ["resp_1", "a", None, "b"]
    assert cursor.response_id == "resp_1" and cursor.last_sequence_number == 2
    assert cursor.resume_params() == {"stream": "true", "starting_after": "2"}
    assert not cursor.ended


async def test_the_parser_reads_the_loopbacks_resumed_stream_into_the_answer_and_usage(
        upstream):
    server, client = upstream
    server.tokens_per_second = 50
    server.responses.fault = "drop_mid_stream"
    cursor = rev.EventCursor()
    parsed = []
    with pytest.raises(httpx2.HTTPError):
        async with client.stream("POST", "/responses", json=body(
                model="o4-mini", reasoning={"summary": "auto"}, background=True,
                store=True)) as response:
            async for event in iter_events(response):
                parsed.append(cursor.feed(event.data))
    # Resume from one event earlier than needed: the cursor drops the duplicate.
    async with client.stream("GET", f"/responses/{cursor.response_id}", params={
            "stream": "true", "starting_after": str(cursor.last_sequence_number - 1)}) as r:
        for event in await read_events(r):
            parsed.append(cursor.feed(event.data))

    parsed = [e for e in parsed if e is not None]
    assert "".join(e.value for e in parsed if e.kind == "text") == ANSWER
    run = server.responses.last
    assert "".join(e.value for e in parsed if e.kind == "reasoning") == "".join(
        run.record.reasoning_written)
    assert cursor.ended and parsed[-1].value.usage == rev.map_usage(run.billed)
    assert parsed[-1].value.usage["reasoning_tokens"] == REASONING_TOKENS
