"""The loopback upstream's ``responses`` dialect: OpenAI's Responses API
(``chat.demo_model.UpstreamServer(dialect="responses")``), for the Responses provider's
tests.

The HTTP side (endpoints, streaming to connections) is chat.demo_responses_http;
this module is the model: what one response generates, and what is kept of it.

A foreground response stops generating as soon as its connection closes (the loopback
then marks it ``cancelled``); a background one keeps generating until it ends or is
cancelled. Every response's billed usage is kept (:attr:`ResponseRun.billed`) so a
test can compare the app's record with what the provider charged, and every call is
counted (:attr:`ResponsesState.calls`).

Event order of one response: ``response.created`` (``response.queued`` too when in the
background), ``response.in_progress``; for a reasoning model (o-series, gpt-5, or a
model name containing "reasoning") a reasoning item: ``response.output_item.added``,
then with ``reasoning.summary`` requested ``response.reasoning_summary_part.added``,
``response.reasoning_summary_text.delta`` per token, ``...text.done``,
``...part.done``, and ``response.output_item.done`` (without a summary the reasoning is
hidden but billed, ``output_tokens_details.reasoning_tokens``); then the message item:
``response.output_item.added``, ``response.content_part.added``,
``response.output_text.delta`` per token, ``response.output_text.done``,
``response.content_part.done``, ``response.output_item.done``; last
``response.completed``, or ``response.incomplete`` with ``incomplete_details.reason``
``max_output_tokens`` when ``max_output_tokens`` (reasoning included) cut it.

Faults (:data:`RESPONSES_FAULTS`, ``server.responses.fault``), after
``server.fault_after`` text deltas: ``drop_mid_stream`` aborts the creating
connection (a background response goes on generating: resume it),
``malformed_event`` writes an event whose data is not JSON, ``unknown_event`` emits an
event of a type no client knows (a real, numbered event), ``response_failed`` ends
with ``response.failed``, ``error_event`` ends with an ``error`` event. The HTTP error
faults of ``server.fault`` (401, 429, 500) and ``server.fail_status`` apply to
``POST /v1/responses`` as to Chat Completions.
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

from .demo_dialects import OPENAI_REASONING_MODEL, reasoning_words

RESPONSES_FAULTS = (
    "drop_mid_stream",   # aborts the creating connection; background generation goes on
    "malformed_event",   # an event whose data is not JSON (not numbered, not replayed)
    "unknown_event",     # a numbered event of an unknown type
    "response_failed",   # ends with response.failed, the error in response.error
    "error_event",       # ends with an "error" event
)
UNKNOWN_EVENT_TYPE = "response.demo_future_feature.delta"
FAILED_ERROR = {"code": "server_error",
                "message": "The model failed to finish the response (test fault)."}
ERROR_EVENT = {"code": "server_error", "param": None,
               "message": "The server had an error while streaming the response (test fault)."}
TERMINAL = ("completed", "incomplete", "failed", "cancelled")
SUMMARY_MODES = ("auto", "concise", "detailed")


def reasoning_model(model: str) -> bool:
    """True for a model that spends a reasoning phase: OpenAI's o-series and gpt-5
    families (OpenAI's reasoning guide), or any name containing "reasoning"."""
    return bool(OPENAI_REASONING_MODEL.match(model)) or "reasoning" in model


def input_messages(body: dict) -> list[dict] | None:
    """The request's ``instructions`` and ``input`` as Chat Completions-style messages
    ``[{"role", "content": str}]`` (for counting and for the demo answer), or None when
    ``input`` is neither a string nor a list. Content parts (``input_text``,
    ``output_text``) are joined; other item types are skipped."""
    messages = []
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "system", "content": instructions})
    given = body.get("input")
    if isinstance(given, str):
        return messages + [{"role": "user", "content": given}]
    if not isinstance(given, list):
        return None
    for item in given:
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            continue
        content = item.get("content")
        if isinstance(content, list):
            content = "".join(str(p.get("text") or "") for p in content if isinstance(p, dict))
        messages.append({"role": str(item.get("role") or "user"), "content": str(content or "")})
    return messages


@dataclass
class Follow:
    """One connection that streamed a response's events: ``origin`` ``"post"`` (the
    creating request) or ``"get"`` (a retrieve with ``stream=true``); times monotonic s."""

    origin: str
    starting_after: int
    started_at: float
    sequence_numbers: list[int] = field(default_factory=list)
    closed_at: float | None = None  # when the client closed it
    dropped: bool = False           # the loopback cut it (fault)


@dataclass
class ResponseRun:
    """One response: its request, its events (pre-encoded SSE, index = sequence_number)
    and what it billed. ``record`` (chat.demo_model.UpstreamRequest) holds the tokens
    generated (``reasoning_written``, ``text_written``: what is billed), the text deltas
    written to the creating connection (``chunks_written``), when that connection was
    closed by the client (``client_closed_at``) and when generation ended
    (``finished_at``)."""

    id: str
    body: dict
    record: object
    messages: list[dict]
    model: str
    background: bool
    store: bool
    prompt_tokens: int
    cached_tokens: int
    created_at: int = field(default_factory=lambda: int(time.time()))
    status: str = "in_progress"
    events: list[tuple[str, str]] = field(default_factory=list)  # (type, SSE text)
    output: list[dict] = field(default_factory=list)
    incomplete_reason: str | None = None
    error: dict | None = None
    billed: dict | None = None  # the usage object at the end: what the provider charged
    follows: list[Follow] = field(default_factory=list)
    task: asyncio.Task | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def reasons(self) -> bool:
        return reasoning_model(self.model)

    @property
    def summary(self) -> bool:
        """Whether the reasoning summary streams (``reasoning.summary`` requested)."""
        reasoning = self.body.get("reasoning")
        return (self.reasons and isinstance(reasoning, dict)
                and reasoning.get("summary") in SUMMARY_MODES)

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    @property
    def event_types(self) -> list[str]:
        """The type of every numbered event so far, in order."""
        return [kind for kind, _ in self.events]

    def usage(self) -> dict:
        """The usage object after what was generated so far (OpenAI's ResponseUsage:
        ``output_tokens`` includes the reasoning tokens)."""
        reasoning = len(self.record.reasoning_written)
        output = reasoning + len(self.record.text_written)
        return {
            "input_tokens": self.prompt_tokens,
            "input_tokens_details": {"cached_tokens": self.cached_tokens},
            "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": self.prompt_tokens + output,
        }

    def snapshot(self) -> dict:
        """The response object now (``usage`` once it ended)."""
        reasoning = self.body.get("reasoning") if isinstance(self.body.get("reasoning"),
                                                             dict) else {}
        return {
            "id": self.id, "object": "response", "created_at": self.created_at,
            "status": self.status, "background": self.background, "error": self.error,
            "incomplete_details": ({"reason": self.incomplete_reason}
                                   if self.incomplete_reason else None),
            "instructions": self.body.get("instructions"),
            "max_output_tokens": self.body.get("max_output_tokens"),
            "model": self.model, "output": copy.deepcopy(self.output),
            "parallel_tool_calls": True, "previous_response_id": None,
            "reasoning": {"effort": reasoning.get("effort"),
                          "summary": reasoning.get("summary")},
            "store": self.store, "temperature": 1.0,
            "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [],
            "top_p": 1.0, "truncation": "disabled", "metadata": {},
            "usage": self.billed if self.finished else None,
        }

    def emit(self, kind: str, **fields) -> None:
        """Append the next numbered event and wake the connections following it."""
        data = {"type": kind, "sequence_number": len(self.events), **fields}
        self.events.append((kind, f"event: {kind}\ndata: {json.dumps(data)}\n\n"))
        self.wake.set()
        self.wake = asyncio.Event()

    def end(self, status: str) -> None:
        """Stop here with ``status``: bill what was generated, wake the followers."""
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()
        if self.finished:
            return
        self.status = status
        for item in self.output:
            if item.get("status") == "in_progress":
                item["status"] = "incomplete"
        self.billed = self.usage()
        self.record.finished_at = time.monotonic()
        self.record.completed = status == "completed"
        self.wake.set()
        self.wake = asyncio.Event()


class ResponsesState:
    """What the ``responses`` dialect keeps (``UpstreamServer.responses``): every
    response by id (stored or not, for inspection), the calls made, and the fault of the
    following responses (one of :data:`RESPONSES_FAULTS`, or None)."""

    def __init__(self):
        self.runs: dict[str, ResponseRun] = {}
        # "POST /responses", "GET /responses/{id}", "POST /responses/{id}/cancel", ...
        self.calls: Counter = Counter()
        self.fault: str | None = None

    @property
    def fault(self) -> str | None:
        return self._fault

    @fault.setter
    def fault(self, value: str | None) -> None:
        if value is not None and value not in RESPONSES_FAULTS:
            raise ValueError(f"unknown responses fault {value!r}; one of {RESPONSES_FAULTS}")
        self._fault = value

    def close(self) -> None:
        """Stop every response still generating (the server is stopping)."""
        for run in self.runs.values():
            if run.task is not None:
                run.task.cancel()

    @property
    def posts(self) -> int:
        """``POST /v1/responses`` calls (answers asked for)."""
        return self.calls["POST /responses"]

    @property
    def gets(self) -> int:
        """``GET /v1/responses/{id}`` calls (retrieves and resumes)."""
        return self.calls["GET /responses/{id}"]

    @property
    def last(self) -> ResponseRun | None:
        """The response created last."""
        return next(reversed(self.runs.values()), None)


async def generate(server, run: ResponseRun) -> None:
    """The model: emits the events of ``run`` paced at ``server.tokens_per_second``,
    independent of any connection (a foreground one is cancelled when its connection
    closes)."""
    fault = server.responses.fault
    record = run.record
    delay = 1.0 / server.tokens_per_second if server.tokens_per_second > 0 else 0
    limit = run.body.get("max_output_tokens")
    run.emit("response.created", response=run.snapshot())
    if run.background:
        run.emit("response.queued", response=run.snapshot())
        run.status = "in_progress"
    run.emit("response.in_progress", response=run.snapshot())
    if server.response_delay:
        await asyncio.sleep(server.response_delay)
    if run.reasons:
        thoughts = reasoning_words(run.messages, server.reasoning_tokens, server.split)
        if limit is not None and len(thoughts) >= limit:
            thoughts, run.incomplete_reason = thoughts[:limit], "max_output_tokens"
        await _reason(run, thoughts, delay)
    if run.incomplete_reason:  # the reasoning used the whole budget: no message item
        run.end("incomplete")
        run.emit("response.incomplete", response=run.snapshot())
        return
    tokens = server.split(server.answer(run.messages) if callable(server.answer)
                          else str(server.answer))
    if limit is not None and len(tokens) > limit - len(record.reasoning_written):
        tokens = tokens[: limit - len(record.reasoning_written)]
        run.incomplete_reason = "max_output_tokens"
    output_index = len(run.output)
    # A Responses API output item (built with dict(): the app's own frames, which share
    # some type names, are built only in chat.generation.frames).
    item = dict(id=f"msg_{uuid.uuid4().hex}", type="message", status="in_progress",
                role="assistant", content=[])
    run.output.append(item)
    run.emit("response.output_item.added", output_index=output_index,
             item=copy.deepcopy(item))
    part = {"type": "output_text", "annotations": [], "text": ""}
    item["content"].append(part)
    where = {"item_id": item["id"], "output_index": output_index, "content_index": 0}
    run.emit("response.content_part.added", **where, part=copy.deepcopy(part))
    for number, token in enumerate(tokens):
        if delay:
            await asyncio.sleep(delay)
        if number == server.fault_after and fault is not None:
            if fault == "unknown_event":
                run.emit(UNKNOWN_EVENT_TYPE, **where, delta="?")
            elif fault == "response_failed":
                run.error = dict(FAILED_ERROR)
                run.end("failed")
                run.emit("response.failed", response=run.snapshot())
                return
            elif fault == "error_event":
                run.end("failed")
                run.emit("error", **ERROR_EVENT)
                return
        record.text_written.append(token)
        part["text"] += token
        run.emit("response.output_text.delta", **where, delta=token, logprobs=[])
    run.emit("response.output_text.done", **where, text=part["text"], logprobs=[])
    run.emit("response.content_part.done", **where, part=copy.deepcopy(part))
    item["status"] = "incomplete" if run.incomplete_reason else "completed"
    run.emit("response.output_item.done", output_index=output_index,
             item=copy.deepcopy(item))
    status = "incomplete" if run.incomplete_reason else "completed"
    run.end(status)
    run.emit(f"response.{status}", response=run.snapshot())


async def _reason(run: ResponseRun, thoughts: list[str], delay: float) -> None:
    """The reasoning item: its summary streamed when requested, else hidden (billed)."""
    item = dict(id=f"rs_{uuid.uuid4().hex}", type="reasoning", summary=[])  # see generate()
    output_index = len(run.output)
    run.output.append(item)
    run.emit("response.output_item.added", output_index=output_index,
             item=copy.deepcopy(item))
    where = {"item_id": item["id"], "output_index": output_index, "summary_index": 0}
    if run.summary:
        run.emit("response.reasoning_summary_part.added", **where,
                 part={"type": "summary_text", "text": ""})
    for token in thoughts:
        if delay:
            await asyncio.sleep(delay)
        run.record.reasoning_written.append(token)
        if run.summary:
            run.emit("response.reasoning_summary_text.delta", **where, delta=token)
    if run.summary:
        text = "".join(run.record.reasoning_written)
        run.emit("response.reasoning_summary_text.done", **where, text=text)
        run.emit("response.reasoning_summary_part.done", **where,
                 part={"type": "summary_text", "text": text})
        item["summary"] = [{"type": "summary_text", "text": text}]
    run.emit("response.output_item.done", output_index=output_index,
             item=copy.deepcopy(item))
