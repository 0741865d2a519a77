"""The Chat Completions provider: ``POST /chat/completions`` with ``stream: true``, as
OpenAI, vLLM, Ollama, llama.cpp, OpenRouter, DeepSeek and other OpenAI-compatible
servers speak it (their differences are the dialect profiles of
chat.generation.profiles.profiles).

The ``openai`` SDK sends the request (auth, retries, HTTP errors, closing); the
response's bytes are read here (chat.generation.profiles.sse_reader) and each chunk
parsed with orjson into a :class:`~.base.StreamEvent` (:func:`_read_chunk`), with no
SDK object per chunk: the SDK's per-chunk objects would cost more CPU than the rest of
the run together. The sockets are read on asyncio directly (.transport, .netstream).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import ssl
from collections.abc import AsyncIterator

import anyio
import httpx2
import openai
from django.conf import settings

from ..errors import UpstreamFailure, UpstreamIncomplete, UpstreamTimeout
from . import profiles, sse_reader, transport
from .base import Provider, StreamEvent, StreamMeta, StreamRequest, guarded
from .text import clean_provider_text, count, provider_message

logger = logging.getLogger(__name__)

# After finish_reason and usage, how long (s) to wait for [DONE] before ending the run as
# completed anyway (at most CHAT_STREAM_IDLE_TIMEOUT_S). Providers send [DONE] in the same
# write as the usage chunk; the wait only keeps the connection reusable.
_DONE_GRACE_S = 2.0
# After [DONE], how long (s) to read the rest of the body (the end of the chunked body)
# so the connection goes back to the pool, as the SDK does.
_DRAIN_S = 0.1
# The SDK's connection limits (openai._constants.DEFAULT_CONNECTION_LIMITS): a client
# given its own transport does not get them.
_CONNECTION_LIMITS = httpx2.Limits(max_connections=1000, max_keepalive_connections=100)


class ChatCompletions(Provider):
    """OpenAI-compatible Chat Completions with the server's dialect profile
    (``OPENAI_PROVIDER``). Counts tokens with the server's tokenizer where the profile
    has one (llama.cpp, vLLM) and looks up OpenRouter's record of a generation after
    the run; it cannot cancel or resume (closing the stream is what stops the
    server)."""

    name = "chat"

    def __init__(self, base_url: str | None, api_key: str):
        super().__init__(base_url, api_key)
        self.client = new_client(base_url, api_key)

    @classmethod
    def key(cls, base_url: str | None, api_key: str) -> tuple:
        return (*super().key(base_url, api_key), settings.CHAT_TUNING.sdk_timeout_s,
                settings.OPENAI_FIRST_BYTE_TIMEOUT_S, settings.OPENAI_MAX_RETRIES)

    def stream(self, request: StreamRequest, meta: StreamMeta) -> AsyncIterator[StreamEvent]:
        meta.provider = self.name
        return stream_answer(self.client, model=request.model, messages=request.messages,
                             max_tokens=request.max_tokens, label=request.label, meta=meta)

    async def count_tokens(self, meta: StreamMeta, model: str, text: str) -> int | None:
        profile = profiles.PROFILES.get(meta.profile)
        if profile is None or not profile.tokenize:
            return None
        return await profiles.tokenize(self.client, profile, model, text)

    def wants_usage_after(self, meta: StreamMeta) -> bool:
        profile = profiles.PROFILES.get(meta.profile)
        return profile is not None and profile.generation_lookup and bool(meta.generation_id)

    async def usage_after(self, meta: StreamMeta) -> dict | None:
        return await profiles.lookup_generation(self.client, meta.generation_id)


def new_client(base_url: str | None, api_key: str) -> openai.AsyncOpenAI:
    """An ``AsyncOpenAI`` client; its connection pool is bound to the running event
    loop, so each loop keeps its own (chat.generation.runtime.Runtime.provider)."""
    # httpx's connect timeout is the first-byte budget: a provider that cannot even be
    # connected to fails as soon as one that never sends its headers (stream_answer
    # bounds the wait for the headers, retries included).
    timeout = openai.Timeout(
        settings.CHAT_TUNING.sdk_timeout_s, connect=settings.OPENAI_FIRST_BYTE_TIMEOUT_S
    )
    # The SDK's own HTTP client and connection limits, its sockets read on asyncio
    # directly (.netstream: anyio's per-read costs dominate a busy worker's loop); the
    # SDK still sends, retries, authenticates and maps errors.
    http_client = openai.DefaultAsyncHttpxClient(
        transport=transport.AsyncioTransport(
            limits=_CONNECTION_LIMITS, read_tick=settings.CHAT_TUNING.read_tick_ms / 1000))
    return openai.AsyncOpenAI(api_key=api_key, base_url=base_url, timeout=timeout,
                              max_retries=settings.OPENAI_MAX_RETRIES,
                              http_client=http_client)


def _reported_usage(usage) -> dict | None:
    """``{"prompt_tokens", "completion_tokens", "reasoning_tokens", "cached_tokens"}``
    from a chunk's ``usage`` (a JSON object), or None when it is missing or its first two
    are not non-negative integers (then the tokens are estimated).

    ``reasoning_tokens``: ``completion_tokens_details.reasoning_tokens`` (OpenAI,
    DeepSeek, OpenRouter; part of completion_tokens); ``cached_tokens``:
    ``prompt_tokens_details.cached_tokens`` (OpenAI, OpenRouter) or DeepSeek's
    ``prompt_cache_hit_tokens`` (part of prompt_tokens); 0 when absent or malformed.
    """
    if not isinstance(usage, dict):
        return None
    prompt, completion = count(usage.get("prompt_tokens")), count(usage.get("completion_tokens"))
    if prompt is None or completion is None:
        return None
    details = usage.get("completion_tokens_details")
    reasoning = count(details.get("reasoning_tokens")) if isinstance(details, dict) else None
    details = usage.get("prompt_tokens_details")
    cached = count(details.get("cached_tokens")) if isinstance(details, dict) else None
    if cached is None:
        cached = count(usage.get("prompt_cache_hit_tokens"))
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "reasoning_tokens": min(reasoning or 0, completion),
            "cached_tokens": min(cached or 0, prompt)}


# Where reasoning text is read, in order: DeepSeek, llama.cpp and older vLLM say
# reasoning_content; OpenRouter, Ollama and newer vLLM say reasoning.
REASONING_KEYS = ("reasoning_content", "reasoning")


def _read_chunk(chunk: dict, reasoning_keys: tuple[str, ...] = REASONING_KEYS) -> StreamEvent:
    """The event of one streamed chunk (a parsed JSON object), all cleaned.

    Tolerates what real providers send beside the reference format: no ``choices``
    (Azure's prompt-filter chunks), ``choices: null`` (some usage chunks), a choice
    without ``delta``, non-string content. A usage on a chunk whose choices all lack a
    finish_reason is a running count (vLLM's continuous_usage_stats), any other is the
    final usage.
    """
    content: list[str] = []
    reasoning: list[str] = []
    finish_reason = ""
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        choices = ()
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        if isinstance(delta, dict):
            text = delta.get("content")
            if isinstance(text, str) and text:
                content.append(clean_provider_text(text))
            for key in reasoning_keys:
                text = delta.get(key)
                if isinstance(text, str) and text:
                    reasoning.append(clean_provider_text(text))
                    break
        reason = choice.get("finish_reason")
        if reason:
            finish_reason = provider_message(reason, 32)
    usage = chunk.get("usage")
    if usage is not None:
        usage = _reported_usage(usage)
        if usage is not None and choices and not finish_reason:
            return StreamEvent(content="".join(content), reasoning="".join(reasoning),
                               running_usage=usage)
    return StreamEvent(content="".join(content), reasoning="".join(reasoning),
                       finish_reason=finish_reason, usage=usage)


def _retry_hint(exc: openai.APIStatusError) -> str:
    """The sentence ``" Retry after N s."`` when a 429/503 answer carries a numeric
    Retry-After header (RFC 9110 section 10.2.3; an HTTP-date is left out), else ``""``."""
    if exc.status_code not in (429, 503):
        return ""
    value = (exc.response.headers.get("retry-after") or "").strip()
    try:
        seconds = float(value)
    except ValueError:
        return ""
    return f" Retry after {seconds:g} s." if 0 <= seconds < 86400 else ""


def _api_message(exc: openai.APIStatusError) -> str:
    body = exc.body if isinstance(exc.body, dict) else {}
    message = body.get("message") or (body.get("error") or {}).get("message") if body else None
    # Not cut here: provider_message masks the key first, then cuts.
    return str(message or exc.message)


def _failure(exc: Exception, label: str) -> UpstreamFailure | None:
    """The user-facing failure of an SDK exception; None for one that is not the
    provider's (a bug: the run reports its type)."""
    if isinstance(exc, openai.APIStatusError):
        return UpstreamFailure(
            f"The model provider answered HTTP {exc.status_code}: "
            f"{provider_message(_api_message(exc))}{_retry_hint(exc)}"
        )
    # The body is read with the SDK's HTTP client (httpx2): its errors while reading are
    # what the SDK would have raised as APITimeoutError / APIConnectionError.
    if isinstance(exc, openai.APITimeoutError | httpx2.TimeoutException):
        return UpstreamFailure("The model provider did not answer in time.")
    if isinstance(exc, openai.APIConnectionError | httpx2.RequestError | ssl.SSLError
                  | anyio.EndOfStream):
        return UpstreamFailure("The connection to the model provider was lost.")
    if isinstance(exc, openai.APIError):
        # An {"error": {...}} event in the stream (the SDK raises it as APIError).
        return UpstreamFailure(
            f"The model provider reported an error: {provider_message(exc.message)}"
        )
    if isinstance(exc, json.JSONDecodeError):
        logger.warning("generation %s: the provider sent a chunk that is not JSON", label)
        return UpstreamFailure("The model provider sent a malformed chunk.")
    return None


# --- one stream --------------------------------------------------------------------------
def stream_answer(
    client: openai.AsyncOpenAI, *, model: str, messages: list[dict], max_tokens: int,
    label: str, meta: StreamMeta | None = None,
) -> AsyncIterator[StreamEvent]:
    """Request a streamed chat completion and yield its events until the provider ends
    the answer; ``label`` (the message id) names the run in logs; ``meta``, when given,
    is filled in as the stream goes (:class:`~.base.StreamMeta`: read it when the run
    ends).

    Raises UpstreamFailure (UpstreamTimeout: no headers within
    OPENAI_FIRST_BYTE_TIMEOUT_S, or nothing for CHAT_STREAM_IDLE_TIMEOUT_S) for every
    fault of the provider; other exceptions are bugs and pass through. Use it inside
    ``contextlib.aclosing``: the HTTP response is closed when the generator is, so a
    cancellation at any await of the caller closes the connection and the provider
    stops generating.
    """
    meta = meta if meta is not None else StreamMeta()
    # The key is masked in the text as it is read: a proxy may echo it in an answer.
    return guarded(_events(client, model, messages, max_tokens, label, meta),
                   model=model, key=settings.OPENAI_API_KEY,
                   classify=functools.partial(_classify, label=label))


def _classify(exc: Exception, label: str) -> tuple[str | None, UpstreamFailure | None]:
    """``(kind, failure)`` of an SDK or HTTP exception (base.guarded): ``kind`` for
    chat_provider_errors_total, ``4xx``/``5xx`` (the HTTP status class of an error
    answer), ``timeout``, ``dropped`` (the connection was lost), ``malformed`` (a chunk
    that is not a JSON object), ``error_event`` (an ``{"error": ...}`` event in the
    stream); ``(None, None)`` for an exception that is not the provider's (a bug)."""
    failure = _failure(exc, label)
    if failure is None:
        return None, None
    if isinstance(exc, openai.APIStatusError):
        return f"{exc.status_code // 100}xx", failure
    if isinstance(exc, openai.APITimeoutError | httpx2.TimeoutException):
        return "timeout", failure
    if isinstance(exc, openai.APIConnectionError | httpx2.RequestError | ssl.SSLError
                  | anyio.EndOfStream):
        return "dropped", failure
    if isinstance(exc, json.JSONDecodeError):
        return "malformed", failure
    return "error_event", failure


def _stream_error(payload: dict) -> UpstreamFailure:
    """The failure of an ``{"error": ...}`` event in the stream (the SDK's wording)."""
    error = payload.get("error")
    message = error.get("message") if isinstance(error, dict) else None
    if not message or not isinstance(message, str):
        message = "An error occurred during streaming"
    return UpstreamFailure(
        f"The model provider reported an error: {provider_message(message)}"
    )


async def _events(client, model, messages, max_tokens, label, meta: StreamMeta
                  ) -> AsyncIterator[StreamEvent]:
    first_byte_s = settings.OPENAI_FIRST_BYTE_TIMEOUT_S
    idle_s = settings.CHAT_STREAM_IDLE_TIMEOUT_S
    base_url = profiles.base_url_of(client)
    # `async with` closes the HTTP response on every exit, including a CancelledError
    # or GeneratorExit raised at any await or yield inside the block.
    async with contextlib.AsyncExitStack() as stack:
        try:
            # Entering returns once the response headers are in; the profile's one-time
            # probe of a server, the SDK's retries and our one retry after a refused
            # optional parameter all spend the same budget.
            async with asyncio.timeout(first_byte_s):
                profile = await profiles.resolve(client)
                body = profile.request_body(model, messages, max_tokens)
                response, body = await _open(stack, client, base_url,
                                             profiles.adapted_body(base_url, body))
        except TimeoutError:
            raise UpstreamTimeout(
                f"The model provider did not start answering within {first_byte_s:g} s."
            ) from None
        http = response.http_response
        meta.hang_up = functools.partial(transport.hang_up, http)
        # Runs before the response is closed (the stack unwinds last in, first out).
        stack.callback(setattr, meta, "hang_up", None)
        meta.profile, meta.hidden_reasoning = profile.name, profile.hides_reasoning(model)
        meta.usage_requested = "stream_options" in body
        reasoning_keys = profile.reasoning_keys
        meta.generation_id = provider_message(http.headers.get("x-generation-id"), 100)
        finish_reason, usage, batching = "", None, False
        lines = sse_reader.data_of(http)
        stack.push_async_callback(lines.aclose)
        while True:
            # Once finish_reason and usage are both in, the answer is whole: [DONE] gets
            # a short grace, and whatever follows (silence, a cut connection, garbage)
            # cannot turn it into a failure.
            whole = bool(finish_reason) and usage is not None
            try:
                async with asyncio.timeout(min(_DONE_GRACE_S, idle_s) if whole else idle_s):
                    data = await anext(lines)
            except StopAsyncIteration:
                if finish_reason:
                    return
                raise UpstreamIncomplete from None
            except TimeoutError:
                if whole:
                    logger.info("generation %s: no [DONE] after its usage; "
                                "ending it as completed", label)
                    return
                raise UpstreamTimeout(
                    f"The model provider sent nothing for {idle_s:g} s."
                ) from None
            except Exception:
                if whole:
                    logger.info("generation %s: stream broke after its usage; "
                                "ending it as completed", label, exc_info=True)
                    return
                raise
            if data.startswith(b"[DONE]"):
                await sse_reader.drain(lines, _DRAIN_S)
                return
            chunk = sse_reader.parse(data)
            if not isinstance(chunk, dict):
                raise json.JSONDecodeError("a chunk is not a JSON object", "", 0)
            if chunk.get("error"):
                raise _stream_error(chunk)
            if not meta.generation_id and isinstance(chunk.get("id"), str):
                meta.generation_id = provider_message(chunk["id"], 100)
            event = _read_chunk(chunk, reasoning_keys)
            if not batching and (event.content or event.reasoning):
                # The first text went out per chunk (TTFT); the rest comes in read ticks.
                batching = True
                transport.batch_reads(http)
            finish_reason = event.finish_reason or finish_reason
            usage = event.usage if event.usage is not None else usage
            yield event


async def _open(stack: contextlib.AsyncExitStack, client, base_url: str, body: dict):
    """Send the request; ``(response, body sent)`` once the server accepts it (its
    headers in). The SDK sends it (auth, retries on 429/5xx and dropped
    connections, HTTP errors as APIStatusError) and hands back the raw response: its
    chunks are parsed here with orjson, not turned into SDK objects (those would cost
    more CPU than the rest of the run). A 400 naming an optional parameter is retried once without
    it (chat.generation.profiles.adapt_after)."""
    for attempt in (1, 2):
        request = client.chat.completions.with_streaming_response.create(**body)
        try:
            response = await stack.enter_async_context(request)
        except openai.APIStatusError as exc:
            retry = profiles.adapt_after(base_url, exc, body) if attempt == 1 else None
            if retry is None:
                raise
            body = retry
            continue
        return response, body
    raise AssertionError("unreachable")
