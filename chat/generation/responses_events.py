"""OpenAI Responses API stream events in a neutral form, for the Responses provider.

Pure functions over one event's JSON object (``data`` of a server-sent event, or
``event.to_dict()`` of the openai SDK's typed event): no I/O, nothing imported from
the rest of the app. Source: OpenAI API reference, "Streaming events" of the Responses
API (every event has ``type`` and ``sequence_number``; terminal ones carry the response
object) and the response object (``status``, ``incomplete_details.reason``, ``error``,
``usage``). llama.cpp's llama-server speaks a subset: no ``sequence_number``, raw
reasoning as ``response.reasoning_text.delta``, usage without
``output_tokens_details``; all of that is accepted.

:func:`parse_event` maps one event to a :class:`ResponsesEvent` whose ``kind`` is

- ``started``: ``response.created`` / ``.queued`` / ``.in_progress``; value: the
  response id;
- ``text``: ``response.output_text.delta``, and ``response.refusal.delta`` (a refusal
  is shown to the user as text); value: the delta (str);
- ``reasoning``: ``response.reasoning_summary_text.delta`` and
  ``response.reasoning_text.delta``; value: the delta; a second summary part
  (``response.reasoning_summary_part.added`` with ``summary_index`` > 0) gives a
  paragraph break ``"\\n\\n"``;
- ``finish``: ``response.completed`` / ``response.incomplete``; value: :class:`Finish`;
- ``failed``: ``response.failed`` and ``error``; value: :class:`Failure`;
- ``ignored``: every other type, known (item and part bookkeeping, ``*.done``) or not
  (new event types appear often);
- ``malformed``: not an object, no string ``type``, or a delta that is not a string;
  value: what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

STARTED, TEXT, REASONING, FINISH, FAILED, IGNORED, MALFORMED = (
    "started", "text", "reasoning", "finish", "failed", "ignored", "malformed")

_STARTED = ("response.created", "response.queued", "response.in_progress")
_TEXT = ("response.output_text.delta", "response.refusal.delta")
_REASONING = ("response.reasoning_summary_text.delta", "response.reasoning_text.delta")
_FINISH = ("response.completed", "response.incomplete")
# incomplete_details.reason -> finish_reason (Chat Completions' words).
_INCOMPLETE = {"max_output_tokens": "length", "content_filter": "content_filter"}
FAILED_MESSAGE = "The model provider reported that the response failed."


@dataclass(frozen=True)
class Finish:
    """How a response ended without failing.

    ``status``: the response's (``completed``, ``incomplete``, ``cancelled``);
    ``finish_reason``: ``stop`` (completed), ``length`` (incomplete,
    ``max_output_tokens``), ``content_filter``, ``cancelled``, or another incomplete
    reason as the provider named it; ``usage``: :func:`map_usage` of its usage, None
    when it reported none.
    """

    status: str
    finish_reason: str
    usage: dict | None


@dataclass(frozen=True)
class Failure:
    """A failed response (``response.failed``) or an ``error`` event: the provider's
    ``message`` (a fixed sentence when it gave none), its ``code`` or None, and the
    usage it reported (a failed response may carry one), else None."""

    message: str
    code: str | None = None
    usage: dict | None = None


@dataclass(frozen=True)
class ResponsesEvent:
    """One parsed event: ``kind`` (module docstring), its ``value``, the event
    ``type`` ("" when missing), its ``sequence_number`` (None when absent, as from
    llama.cpp) and the ``response_id`` when the event carries the response object."""

    kind: str
    value: object
    type: str
    sequence_number: int | None = None
    response_id: str | None = None


def _count(value) -> int:
    """A token count from untrusted JSON: a non-negative int, else 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def map_usage(usage) -> dict | None:
    """A Responses usage object as the app's usage ``{"prompt_tokens",
    "completion_tokens", "reasoning_tokens", "cached_tokens"}`` (tokens):
    ``input_tokens`` -> prompt_tokens, ``output_tokens`` -> completion_tokens (it
    includes the reasoning tokens, as Chat Completions' completion_tokens does),
    ``output_tokens_details.reasoning_tokens`` -> reasoning_tokens,
    ``input_tokens_details.cached_tokens`` -> cached_tokens. Missing details count 0.
    None when ``usage`` is not an object with ``input_tokens`` or ``output_tokens``."""
    if not isinstance(usage, dict) or not ({"input_tokens", "output_tokens"} & usage.keys()):
        return None
    inputs = usage.get("input_tokens_details")
    outputs = usage.get("output_tokens_details")
    return {
        "prompt_tokens": _count(usage.get("input_tokens")),
        "completion_tokens": _count(usage.get("output_tokens")),
        "reasoning_tokens": _count(outputs.get("reasoning_tokens"))
        if isinstance(outputs, dict) else 0,
        "cached_tokens": _count(inputs.get("cached_tokens")) if isinstance(inputs, dict) else 0,
    }


def finish_reason(response) -> str | None:
    """The finish_reason of a response object by its ``status``: ``completed`` ->
    ``stop``; ``incomplete`` -> by ``incomplete_details.reason``
    (``max_output_tokens`` -> ``length``, ``content_filter`` -> ``content_filter``,
    another reason as named, none -> ``length``); ``cancelled`` -> ``cancelled``;
    ``failed`` -> ``error``; None while ``queued``/``in_progress`` or unknown."""
    if not isinstance(response, dict):
        return None
    status = response.get("status")
    if status == "completed":
        return "stop"
    if status == "incomplete":
        details = response.get("incomplete_details")
        reason = details.get("reason") if isinstance(details, dict) else None
        if not isinstance(reason, str) or not reason:
            return "length"
        return _INCOMPLETE.get(reason, reason)
    return {"cancelled": "cancelled", "failed": "error"}.get(status)


def response_outcome(response) -> Finish | Failure | None:
    """The end of a response object as a cancel reply or a retrieve gives it:
    :class:`Failure` when ``failed``, :class:`Finish` when completed, incomplete or
    cancelled, None while it is still ``queued`` or ``in_progress``."""
    if not isinstance(response, dict):
        return None
    usage = map_usage(response.get("usage"))
    if response.get("status") == "failed":
        error = response.get("error") if isinstance(response.get("error"), dict) else {}
        return _failure(error, usage)
    reason = finish_reason(response)
    if reason is None:
        return None
    return Finish(status=str(response["status"]), finish_reason=reason, usage=usage)


def _failure(error: dict, usage: dict | None) -> Failure:
    message = error.get("message")
    code = error.get("code")
    return Failure(message=message if isinstance(message, str) and message.strip()
                   else FAILED_MESSAGE,
                   code=code if isinstance(code, str) else None, usage=usage)


def parse_event(data) -> ResponsesEvent:
    """One Responses stream event (a decoded JSON object) as a :class:`ResponsesEvent`
    (kinds in the module docstring). Never raises on provider input."""
    if not isinstance(data, dict):
        return ResponsesEvent(MALFORMED, "the event is not a JSON object", "")
    kind = data.get("type")
    if not isinstance(kind, str) or not kind:
        return ResponsesEvent(MALFORMED, "the event has no type", "")
    number = data.get("sequence_number")
    number = number if isinstance(number, int) and not isinstance(number, bool) else None
    response = data.get("response")
    response = response if isinstance(response, dict) else None
    response_id = response.get("id") if response is not None else None
    response_id = response_id if isinstance(response_id, str) and response_id else None

    def event(what: str, value=None) -> ResponsesEvent:
        return ResponsesEvent(what, value, kind, number, response_id)

    if kind in _TEXT or kind in _REASONING:
        delta = data.get("delta")
        if not isinstance(delta, str):
            return event(MALFORMED, f"{kind} without a string delta")
        return event(TEXT if kind in _TEXT else REASONING, delta)
    if kind == "response.reasoning_summary_part.added":
        index = data.get("summary_index")
        if isinstance(index, int) and not isinstance(index, bool) and index > 0:
            return event(REASONING, "\n\n")
        return event(IGNORED)
    if kind in _STARTED:
        return event(STARTED, response_id)
    if kind in _FINISH:
        outcome = response_outcome(response)
        if not isinstance(outcome, Finish):
            # A terminal event whose response says otherwise: trust the event type.
            usage = map_usage(response.get("usage")) if response is not None else None
            outcome = Finish(status=kind.removeprefix("response."),
                             finish_reason="stop" if kind == "response.completed"
                             else "length", usage=usage)
        return event(FINISH, outcome)
    if kind == "response.failed":
        error = response.get("error") if response is not None else None
        usage = map_usage(response.get("usage")) if response is not None else None
        return event(FAILED, _failure(error if isinstance(error, dict) else {}, usage))
    if kind == "error":
        return event(FAILED, _failure(data, None))
    return event(IGNORED)


class EventCursor:
    """Reads one response's events across resumed streams, each delivered once.

    ``feed(data)`` parses an event and returns it, or None when its
    ``sequence_number`` is not above the last one seen (a replayed duplicate);
    events without a number are always returned. ``response_id`` is the first id
    seen (or the one given), ``last_sequence_number`` the resume point for
    ``GET /v1/responses/{id}?stream=true&starting_after=<n>`` (None before any
    numbered event), ``ended`` true once a ``finish`` or ``failed`` event was fed.
    """

    def __init__(self, response_id: str | None = None,
                 last_sequence_number: int | None = None):
        self.response_id = response_id
        self.last_sequence_number = last_sequence_number
        self.ended = False

    def feed(self, data) -> ResponsesEvent | None:
        event = parse_event(data)
        number = event.sequence_number
        if number is not None:
            if self.last_sequence_number is not None and number <= self.last_sequence_number:
                return None
            self.last_sequence_number = number
        if self.response_id is None and event.response_id is not None:
            self.response_id = event.response_id
        if event.kind in (FINISH, FAILED):
            self.ended = True
        return event

    def resume_params(self) -> dict:
        """Query parameters of the resuming retrieve: ``{"stream": "true"}`` plus
        ``starting_after`` once a numbered event was seen."""
        params = {"stream": "true"}
        if self.last_sequence_number is not None:
            params["starting_after"] = str(self.last_sequence_number)
        return params
