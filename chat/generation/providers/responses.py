"""The Responses provider: OpenAI's Responses API, ``POST /v1/responses`` with
``stream: true`` (OpenAI API reference, "Responses": create, retrieve, cancel, and
"Streaming events"; the guide "Background mode"), as OpenAI, LiteLLM and llama.cpp's
llama-server serve it.

The request: ``model``, ``input`` (the conversation as input messages), the system
prompt as ``instructions``, ``max_output_tokens``, ``stream: true``, ``store: false``
(``true`` in background mode), and for a reasoning model (:func:`is_reasoning_model`)
``reasoning: {"summary": "auto"}`` so its reasoning summary streams.

The typed events are read from the raw response with orjson (.sse_reader) and mapped by
chat.generation.responses_events (the pure parser) to :class:`~.base.StreamEvent`:
answer and refusal text, reasoning (summary or raw), the finish and the usage; unknown
event types are skipped.

``OPENAI_BACKGROUND=1`` creates responses with ``background: true, store: true``. The
provider then keeps generating when the connection closes, so a stop also calls
``POST /v1/responses/{id}/cancel`` (:meth:`Responses.cancel`, which returns the
cancelled response's usage); and a stream cut before its terminal event is resumed with
``GET /v1/responses/{id}?stream=true&starting_after=<n>`` (:meth:`Responses.resume`),
each event delivered once (chat.generation.responses_events.EventCursor).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
from collections.abc import AsyncIterator

import openai
from django.conf import settings

from .. import responses_events as rev
from ..errors import HungUp, UpstreamFailure, UpstreamIncomplete, UpstreamTimeout
from . import profiles, sse_reader, transport
from .base import Provider, StreamEvent, StreamMeta, StreamRequest, guarded
from .chat_completions import _classify, new_client
from .text import clean_provider_text, provider_message

logger = logging.getLogger(__name__)

# Models that reason before answering and stream a reasoning summary when asked
# (``reasoning.summary``): OpenAI's o-series and the gpt-5 family (OpenAI reasoning
# guide), by name, with or without a gateway's "openai/" prefix. Other models are not
# sent ``reasoning`` (a server may refuse the parameter for them).
REASONING_MODEL = re.compile(r"^(?:openai/)?(o1|o3|o4|gpt-5)([-.].*)?$")
# A cut background stream is resumed this many times, waiting RESUME_BACKOFF_S, doubled
# each time, before each attempt; then the run fails.
RESUME_ATTEMPTS = 3
RESUME_BACKOFF_S = 0.25
# After a cancel, the cancelled response's usage is asked for (the cancel reply, then
# GET /v1/responses/{id}) for at most this long (s) in all, every CANCEL_POLL_S.
CANCEL_WINDOW_S = 5.0
CANCEL_POLL_S = 0.2
# After the terminal event, how long (s) to read the end of the body, so the
# connection goes back to the pool.
_DRAIN_S = 0.1


def is_reasoning_model(model: str) -> bool:
    """True for a model that gets ``reasoning: {"summary": "auto"}``
    (:data:`REASONING_MODEL`)."""
    return bool(REASONING_MODEL.match(model))


def request_body(request: StreamRequest, *, background: bool) -> dict:
    """The create request of ``request``: the leading system messages become
    ``instructions`` (joined by a blank line), the others input messages ``{"role",
    "content"}`` (an easy input message: the role and its text)."""
    messages = list(request.messages)
    instructions = []
    while messages and messages[0].get("role") == "system":
        instructions.append(str(messages.pop(0).get("content") or ""))
    body: dict = {
        "model": request.model,
        "input": [{"role": str(m.get("role") or "user"), "content": str(m.get("content") or "")}
                  for m in messages],
        "max_output_tokens": request.max_tokens,
        "stream": True,
        # Background mode needs the response stored (HTTP 400 otherwise).
        "store": background,
    }
    if instructions:
        body["instructions"] = "\n\n".join(instructions)
    if background:
        body["background"] = True
    if is_reasoning_model(request.model):
        body["reasoning"] = {"summary": "auto"}
    return body


class _Cut(Exception):
    """The stream ended before its terminal event (a clean end of the body, a dropped
    connection, a read timeout, an HTTP error of a resume): resumable in background
    mode; ``cause`` is what to raise when it is not resumed."""

    def __init__(self, cause: Exception):
        super().__init__(str(cause))
        self.cause = cause


class Responses(Provider):
    """OpenAI's Responses API (``OPENAI_API=responses``; the default of the ``openai``
    profile). In background mode (``OPENAI_BACKGROUND``) it can cancel a response at the
    provider and resume a cut stream; otherwise closing the stream is the stop."""

    name = "responses"

    def __init__(self, base_url: str | None, api_key: str):
        super().__init__(base_url, api_key)
        self.client = new_client(base_url, api_key)
        self.background = bool(getattr(settings, "OPENAI_BACKGROUND", False))
        # Only a background (stored) response can be cancelled or streamed again.
        self.can_cancel = self.can_resume = self.background

    @classmethod
    def key(cls, base_url: str | None, api_key: str) -> tuple:
        return (*super().key(base_url, api_key), settings.CHAT_TUNING.sdk_timeout_s,
                settings.OPENAI_FIRST_BYTE_TIMEOUT_S, settings.OPENAI_MAX_RETRIES,
                bool(getattr(settings, "OPENAI_BACKGROUND", False)))

    # -- streaming ---------------------------------------------------------------------
    def stream(self, request: StreamRequest, meta: StreamMeta) -> AsyncIterator[StreamEvent]:
        """The events of a new response (see :class:`~.base.Provider`); in background
        mode a cut is resumed up to RESUME_ATTEMPTS times before the run fails."""
        return self._guarded(request, meta, rev.EventCursor())

    def resume(self, request: StreamRequest, meta: StreamMeta, response_id: str,
               after_sequence: int) -> AsyncIterator[StreamEvent]:
        """The events of background response ``response_id`` after sequence number
        ``after_sequence`` (-1: from the start), then the live ones, with the same
        resumes after a cut as :meth:`stream`; no new response is created. For another
        worker continuing a run (the response id and sequence number saved with its
        checkpoint: ``StreamMeta.generation_id`` and ``StreamMeta.sequence``)."""
        cursor = rev.EventCursor(response_id, after_sequence if after_sequence >= 0 else None)
        return self._guarded(request, meta, cursor, resuming=True)

    def _guarded(self, request, meta, cursor, resuming=False):
        meta.provider = self.name
        return guarded(self._events(request, meta, cursor, resuming), model=request.model,
                       key=settings.OPENAI_API_KEY, meta=meta,
                       classify=functools.partial(_classify, label=request.label))

    async def _events(self, request: StreamRequest, meta: StreamMeta,
                      cursor: rev.EventCursor, resuming: bool) -> AsyncIterator[StreamEvent]:
        # The server's profile (asked once per base URL and process, at most
        # profiles.LOOKUP_TIMEOUT_S): llama.cpp's tokenizer counts a stopped answer.
        meta.profile = (await profiles.resolve(self.client)).name
        # Reasoning tokens are billed beyond the summary streamed: an estimate undercounts.
        meta.hidden_reasoning = is_reasoning_model(request.model)
        if cursor.response_id:
            meta.generation_id = cursor.response_id
        stopped = []  # a stop hung up the connection: never resume after it
        attempt = 0
        while True:
            try:
                async for event in self._one_stream(request, meta, cursor, stopped,
                                                    resume=resuming or attempt > 0):
                    yield event
                return
            except _Cut as cut:
                attempt += 1
                if stopped:  # this process hung up (a stop, a handover): never resumed
                    raise HungUp("The stream was closed by this server.") from cut.cause
                if not self.background or not cursor.response_id \
                        or attempt > RESUME_ATTEMPTS:
                    raise cut.cause from None
                logger.info("generation %s: stream of %s cut after event %s (%s); "
                            "resuming (%d/%d)", request.label, cursor.response_id,
                            cursor.last_sequence_number, type(cut.cause).__name__,
                            attempt, RESUME_ATTEMPTS)
                await asyncio.sleep(RESUME_BACKOFF_S * 2 ** (attempt - 1))

    async def _one_stream(self, request, meta, cursor, stopped, *, resume: bool):
        first_byte_s = settings.OPENAI_FIRST_BYTE_TIMEOUT_S
        idle_s = settings.CHAT_STREAM_IDLE_TIMEOUT_S
        async with contextlib.AsyncExitStack() as stack:
            try:
                async with asyncio.timeout(first_byte_s):
                    if resume:
                        extra = {} if cursor.last_sequence_number is None else \
                            {"starting_after": cursor.last_sequence_number}
                        opening = self.client.responses.with_streaming_response.retrieve(
                            cursor.response_id, stream=True, **extra)
                    else:
                        body = request_body(request, background=self.background)
                        opening = self.client.responses.with_streaming_response.create(**body)
                    response = await stack.enter_async_context(opening)
            except TimeoutError:
                failure = UpstreamTimeout(
                    f"The model provider did not start answering within {first_byte_s:g} s.")
                raise (_Cut(failure) if resume else failure) from None
            except (openai.APIStatusError, openai.APIConnectionError) as exc:
                if resume:  # a resume refused (5xx) or not connected: try again
                    raise _Cut(exc) from exc
                raise
            http = response.http_response

            def hang_up(http=http):
                stopped.append(True)
                transport.hang_up(http)

            meta.hang_up = hang_up
            stack.callback(setattr, meta, "hang_up", None)
            lines = sse_reader.data_of(http)
            stack.push_async_callback(lines.aclose)
            batching = False
            while True:
                try:
                    async with asyncio.timeout(idle_s):
                        data = await anext(lines)
                except StopAsyncIteration:
                    # The body ended before the terminal event.
                    raise _Cut(UpstreamIncomplete()) from None
                except TimeoutError:
                    raise _Cut(UpstreamTimeout(
                        f"The model provider sent nothing for {idle_s:g} s.")) from None
                except Exception as exc:
                    # A lost connection or a read timeout (the HTTP client's errors).
                    if _classify(exc, request.label)[0] in ("dropped", "timeout"):
                        raise _Cut(exc) from exc
                    raise
                parsed = sse_reader.parse(data)
                event = cursor.feed(parsed)
                if event is None:  # replayed: delivered already
                    continue
                if cursor.response_id and not meta.generation_id:
                    meta.generation_id = provider_message(cursor.response_id, 100)
                if cursor.last_sequence_number is not None:
                    meta.sequence = cursor.last_sequence_number
                if event.kind == rev.FAILED:
                    failure: rev.Failure = event.value
                    if failure.usage is not None:  # what the failed response billed
                        yield StreamEvent(usage=failure.usage)
                    raise UpstreamFailure("The model provider reported an error: "
                                          f"{provider_message(failure.message)}")
                out = _stream_event(event, request.label)
                if out is None:
                    continue
                if not batching and (out.content or out.reasoning):
                    batching = True
                    transport.batch_reads(http)
                yield out
                if out.finish_reason:
                    await sse_reader.drain(lines, _DRAIN_S)
                    return

    # -- after the stream ---------------------------------------------------------------
    async def count_tokens(self, meta: StreamMeta, model: str, text: str) -> int | None:
        """The server's own count (llama.cpp, vLLM: profiles.tokenize), else None."""
        profile = profiles.PROFILES.get(meta.profile)
        if profile is None or not profile.tokenize:
            return None
        return await profiles.tokenize(self.client, profile, model, text)

    async def cancel(self, response_id: str) -> dict | None:
        """``POST /v1/responses/{id}/cancel``, then the cancelled (or already ended)
        response's usage: from the cancel reply, else ``GET /v1/responses/{id}`` every
        CANCEL_POLL_S until it has ended, for CANCEL_WINDOW_S in all. Returns the usage
        (``{"prompt_tokens", "completion_tokens", "reasoning_tokens",
        "cached_tokens"}``, tokens) or None (not in background mode, no usage in time,
        any failure). Never raises."""
        if not self.background or not response_id:
            return None
        client = self.client.with_options(max_retries=1)
        path = f"/responses/{response_id}"
        try:
            async with asyncio.timeout(CANCEL_WINDOW_S):
                try:
                    answer = await client.post(f"{path}/cancel", cast_to=object)
                except openai.APIStatusError as exc:
                    # Already ended (some servers answer 4xx): its record still has usage.
                    logger.info("cancel of %s answered HTTP %s", response_id, exc.status_code)
                    answer = None
                while True:
                    usage = _ended_usage(answer)
                    if usage is not None:
                        return usage
                    await asyncio.sleep(CANCEL_POLL_S)
                    try:
                        answer = await client.get(path, cast_to=object)
                    except openai.APIStatusError as exc:
                        if exc.status_code == 404:
                            return None
                        answer = None
        except TimeoutError:
            logger.warning("no usage of cancelled response %s within %g s", response_id,
                           CANCEL_WINDOW_S)
        except Exception:  # noqa: BLE001 - a cancel that fails leaves the counted usage
            logger.warning("cancel of response %s failed", response_id, exc_info=True)
        return None


def _ended_usage(response) -> dict | None:
    """The usage of a response object that has ended, else None."""
    outcome = rev.response_outcome(response)
    return outcome.usage if outcome is not None else None


def _stream_event(event: rev.ResponsesEvent, label: str) -> StreamEvent | None:
    """The StreamEvent of one parsed event, None for one that says nothing to the run.
    Raises json.JSONDecodeError for a malformed event (counted as ``malformed``);
    ``failed`` events are the caller's."""
    kind = event.kind
    if kind == rev.TEXT:
        return StreamEvent(content=clean_provider_text(event.value)) if event.value else None
    if kind == rev.REASONING:
        return StreamEvent(reasoning=clean_provider_text(event.value)) if event.value else None
    if kind == rev.FINISH:
        finish: rev.Finish = event.value
        return StreamEvent(finish_reason=provider_message(finish.finish_reason, 32),
                           usage=finish.usage)
    if kind == rev.MALFORMED:
        logger.warning("generation %s: the provider sent a malformed event (%s)", label,
                       event.value)
        raise json.JSONDecodeError(str(event.value), "", 0)
    return None

