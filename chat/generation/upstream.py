"""The provider: its client, the request, and the reading of one stream into
:class:`StreamEvent` values. The runtime never touches SDK objects: provider
differences (and the SDK itself) stay in this module.

The ``openai`` SDK sends the request (auth, retries, HTTP errors, closing); the
response's bytes are read here (chat.generation.sse) and each chunk parsed with orjson
into a :class:`StreamEvent` (:func:`_read_chunk`), with no SDK object per chunk.

Provider output is untrusted input: text is cleaned here (:func:`clean_provider_text`),
usage counts are checked, and the API key is masked in any provider message and in the
streamed text (:class:`StreamMasks`, also when chunks split it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import re
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import anyio
import httpx2
import openai
from django.conf import settings

from .. import metrics
from . import netstream, providers, sse
from .errors import UpstreamFailure, UpstreamTimeout

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


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """What one chunk of the stream said, cleaned.

    - ``content``: visible answer text (may be "");
    - ``reasoning``: reasoning ("thinking") text the provider streams beside the answer
      (``delta.reasoning_content``: DeepSeek, llama.cpp, older vLLM; ``delta.reasoning``:
      OpenRouter, Ollama, newer vLLM), may be "";
    - ``finish_reason``: "" until the provider gives one; at most 32 chars;
    - ``usage``: the provider's final usage, or None: ``{"prompt_tokens",
      "completion_tokens", "reasoning_tokens", "cached_tokens"}``, non-negative ints
      (the last two 0 when not reported: ``completion_tokens_details.reasoning_tokens``,
      ``prompt_tokens_details.cached_tokens`` of the OpenAI usage object);
    - ``running_usage``: a running count of the same shape sent on a content chunk
      (vLLM/SGLang ``stream_options.continuous_usage_stats``), or None.
    """

    content: str = ""
    reasoning: str = ""
    finish_reason: str = ""
    usage: dict | None = None
    running_usage: dict | None = None


@dataclass(slots=True)
class StreamMeta:
    """What the caller of :func:`stream_answer` learns about a stream beside its events
    (filled in by the reader, read by the run when it ends).

    - ``profile``: the provider profile used (``openai``, ``vllm``, ``ollama``,
      ``llamacpp``, ``openrouter``, ``deepseek``, ``generic``);
    - ``generation_id``: the provider's id of this generation (OpenRouter's
      ``X-Generation-Id`` header, else the first chunk's ``id``), "" if none;
    - ``usage_requested``: False when ``stream_options`` had to be dropped for this
      server (then no usage can arrive and the run's usage is estimated or tokenized);
    - ``hidden_reasoning``: True when the provider bills reasoning tokens it does not
      stream (OpenAI reasoning models), so a stopped run's estimate undercounts them;
    - ``hang_up``: while the response is open, closes its connection at once
      (netstream.hang_up), so a stop reaches the provider before the reading task's
      next step; None before the headers are in and once the response is closed (its
      connection may then serve another request).
    """

    profile: str = "generic"
    generation_id: str = ""
    usage_requested: bool = True
    hidden_reasoning: bool = False
    hang_up: Callable[[], None] | None = None


# --- the client ------------------------------------------------------------------------
def uses_demo_model() -> bool:
    """True when neither OPENAI_API_KEY nor OPENAI_BASE_URL is set."""
    return not settings.OPENAI_API_KEY and not settings.OPENAI_BASE_URL


def configured_provider() -> tuple[str | None, str]:
    """``(base_url, api_key)`` of the configured provider (base_url None: the SDK's)."""
    # Local servers (vLLM, Ollama, llama.cpp) accept any key but the SDK wants one.
    return settings.OPENAI_BASE_URL or None, settings.OPENAI_API_KEY or "none"


def client_key(base_url: str | None, api_key: str) -> tuple:
    """What makes two clients interchangeable (the key only hashed)."""
    return (base_url, hash(api_key), settings.OPENAI_TIMEOUT_S,
            settings.OPENAI_FIRST_BYTE_TIMEOUT_S, settings.OPENAI_MAX_RETRIES)


def new_client(base_url: str | None, api_key: str) -> openai.AsyncOpenAI:
    """An ``AsyncOpenAI`` client; its connection pool is bound to the running event
    loop, so each loop keeps its own (chat.generation.runtime.Runtime.client)."""
    # httpx's connect timeout is the first-byte budget: a provider that cannot even be
    # connected to fails as soon as one that never sends its headers (stream_answer
    # bounds the wait for the headers, retries included).
    timeout = openai.Timeout(
        settings.OPENAI_TIMEOUT_S, connect=settings.OPENAI_FIRST_BYTE_TIMEOUT_S
    )
    # The SDK's own HTTP client and connection limits, its sockets read on asyncio
    # directly (chat.generation.netstream: anyio's per-read costs were a quarter of the
    # worker's event loop); the SDK still sends, retries, authenticates and maps errors.
    http_client = openai.DefaultAsyncHttpxClient(
        transport=netstream.AsyncioTransport(
            limits=_CONNECTION_LIMITS, read_tick=settings.CHAT_TUNING.read_tick_ms / 1000))
    return openai.AsyncOpenAI(api_key=api_key, base_url=base_url, timeout=timeout,
                              max_retries=settings.OPENAI_MAX_RETRIES,
                              http_client=http_client)


# --- what the provider sends (untrusted input) ----------------------------------------
# Lone UTF-16 surrogates (a JSON escape such as "\udcff") cannot be encoded as UTF-8 by
# any database driver, and PostgreSQL refuses NUL in text.
_UNSAFE_TEXT = re.compile(r"[\x00\ud800-\udfff]")


def clean_provider_text(text: str) -> str:
    """Provider text made safe to store and send: each lone surrogate becomes U+FFFD
    (the Unicode replacement character, as a UTF-8 decoder does with bad bytes) and NUL
    characters are dropped. Anything else, control characters included, is kept.

    Applied where chunks are read (:func:`_read_chunk`) to content, finish reasons and
    error messages, so one provider's bad output cannot fail a database write shared
    with other runs (the batched checkpoint, store.checkpoint_many). Python strings
    hold code points, so a surrogate here is always unpaired: ``json.loads`` already
    joins escaped pairs. The API key is masked after, per stream (:class:`StreamMasks`
    in :func:`stream_answer`: a key may span chunks) and in messages (:func:`mask_key`).
    """
    if not _UNSAFE_TEXT.search(text):
        return text
    return _UNSAFE_TEXT.sub(lambda m: "" if m.group() == "\x00" else "\ufffd", text)


# What the configured API key is replaced by wherever provider text may echo it.
KEY_MASK = "***"
# A shorter key is not masked (too short to tell from ordinary text); a key prefix this
# long left at the end of a stream (the key cut by the end) is masked as the key.
_MIN_KEY_CHARS = 8


def mask_key(text: str, key: str | None = None) -> str:
    """``text`` with every occurrence of ``key`` (default: settings.OPENAI_API_KEY)
    replaced by ``***``; keys shorter than 8 characters are not masked. Mask before
    cutting a text: a cut through the key would leave a prefix nothing recognises."""
    key = settings.OPENAI_API_KEY if key is None else key
    if key and len(key) >= _MIN_KEY_CHARS and key in text:
        return text.replace(key, KEY_MASK)
    return text


def _provider_message(value, limit: int = 300) -> str:
    """A provider's message (any JSON value) as clean text of at most ``limit`` chars;
    the configured API key is masked, before the cut, should a provider or proxy echo
    it."""
    return mask_key(clean_provider_text(str(value or "").strip()))[:limit]


class KeyMask:
    """Masks an API key in one kind of streamed text (answer or reasoning) of one stream,
    also when the provider's chunks split it.

    :meth:`feed` takes the next chunk's text and returns what may be sent now: the key
    masked, and the tail that could begin it (a proper prefix of the key, so at most
    ``len(key) - 1`` characters, and only when the tail matches) held back and joined
    to the next chunk. :meth:`flush` gives the held tail once the text has ended (a
    prefix of 8 or more characters, the key cut by the end, comes out masked). Cost per
    chunk: one substring test and a search for the key's first character in the
    chunk's last ``len(key) - 1`` characters."""

    __slots__ = ("_first", "_held", "_key")

    def __init__(self, key: str):
        self._key, self._first, self._held = key, key[0], ""

    @property
    def holding(self) -> bool:
        return bool(self._held)

    def feed(self, text: str) -> str:
        """The part of the held text plus ``text`` that can be sent now, key masked."""
        if self._held:
            text, self._held = self._held + text, ""
        key = self._key
        if key in text:
            text = text.replace(key, KEY_MASK)
        # The longest tail that is a proper prefix of the key: the first match wins.
        at = text.find(self._first, max(len(text) - len(key) + 1, 0))
        while at != -1:
            if key.startswith(text[at:]):
                self._held = text[at:]
                return text[:at]
            at = text.find(self._first, at + 1)
        return text

    def flush(self) -> str:
        """The held text, now that no more text of this kind follows."""
        held, self._held = self._held, ""
        return KEY_MASK if len(held) >= _MIN_KEY_CHARS else held


class StreamMasks:
    """The key masks of one stream's answer and reasoning text (:class:`KeyMask`)."""

    __slots__ = ("content", "reasoning")

    def __init__(self, key: str):
        self.content, self.reasoning = KeyMask(key), KeyMask(key)

    @classmethod
    def for_key(cls, key: str | None) -> StreamMasks | None:
        """The masks for ``key``; None when it is too short to mask (or unset)."""
        return cls(key) if key and len(key) >= _MIN_KEY_CHARS else None

    def event(self, event: StreamEvent) -> StreamEvent:
        """``event`` with its text masked: reasoning held back is released when answer
        text follows, and all that is held once the provider gives a finish_reason."""
        content, reasoning = event.content, event.reasoning
        final = bool(event.finish_reason)
        if reasoning:
            reasoning = self.reasoning.feed(reasoning)
        if (content or final) and self.reasoning.holding:
            reasoning += self.reasoning.flush()
        if content:
            content = self.content.feed(content)
        if final and self.content.holding:
            content += self.content.flush()
        if content is event.content and reasoning is event.reasoning:
            return event
        return dataclasses.replace(event, content=content, reasoning=reasoning)

    def flush(self) -> StreamEvent | None:
        """An event of the text still held (the stream ended), or None."""
        if not (self.content.holding or self.reasoning.holding):
            return None
        return StreamEvent(content=self.content.flush(), reasoning=self.reasoning.flush())


def _count(value) -> int | None:
    """A token count as reported, or None when it is not a believable one: above 10**9
    a count is not believable, and would overflow UsageRecord's fields."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10**9:
        return None
    return value


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
    prompt, completion = _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))
    if prompt is None or completion is None:
        return None
    details = usage.get("completion_tokens_details")
    reasoning = _count(details.get("reasoning_tokens")) if isinstance(details, dict) else None
    details = usage.get("prompt_tokens_details")
    cached = _count(details.get("cached_tokens")) if isinstance(details, dict) else None
    if cached is None:
        cached = _count(usage.get("prompt_cache_hit_tokens"))
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
            finish_reason = _provider_message(reason, 32)
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
    # Not cut here: _provider_message masks the key first, then cuts.
    return str(message or exc.message)


def _failure(exc: Exception, label: str) -> UpstreamFailure | None:
    """The user-facing failure of an SDK exception; None for one that is not the
    provider's (a bug: the run reports its type)."""
    if isinstance(exc, openai.APIStatusError):
        return UpstreamFailure(
            f"The model provider answered HTTP {exc.status_code}: "
            f"{_provider_message(_api_message(exc))}{_retry_hint(exc)}"
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
            f"The model provider reported an error: {_provider_message(exc.message)}"
        )
    if isinstance(exc, json.JSONDecodeError):
        logger.warning("generation %s: the provider sent a chunk that is not JSON", label)
        return UpstreamFailure("The model provider sent a malformed chunk.")
    return None


# --- one stream --------------------------------------------------------------------------
async def stream_answer(
    client: openai.AsyncOpenAI, *, model: str, messages: list[dict], max_tokens: int,
    label: str, meta: StreamMeta | None = None,
) -> AsyncIterator[StreamEvent]:
    """Request a streamed chat completion and yield its events until the provider ends
    the answer; ``label`` (the message id) names the run in logs; ``meta``, when given,
    is filled in as the stream goes (:class:`StreamMeta`: read it when the run ends).

    Raises UpstreamFailure (UpstreamTimeout: no headers within
    OPENAI_FIRST_BYTE_TIMEOUT_S, or nothing for CHAT_STREAM_IDLE_TIMEOUT_S) for every
    fault of the provider; other exceptions are bugs and pass through. Use it inside
    ``contextlib.aclosing``: the HTTP response is closed when the generator is, so a
    cancellation at any await of the caller closes the connection and the provider
    stops generating.
    """
    meta = meta if meta is not None else StreamMeta()
    # The key is masked in the text as it is read: a proxy may echo it in an answer.
    masks = StreamMasks.for_key(settings.OPENAI_API_KEY)
    try:
        async for event in _events(client, model, messages, max_tokens, label, meta):
            yield event if masks is None else masks.event(event)
    except Exception as exc:
        metrics.provider_error(model, error_kind(exc))
        failure = _failure(exc, label)
        if failure is None:
            raise
        if masks is not None and (tail := masks.flush()) is not None:
            yield tail  # the text received before the failure is kept whole
        raise failure from exc
    if masks is not None and (tail := masks.flush()) is not None:
        yield tail


def error_kind(exc: Exception) -> str | None:
    """The kind of a provider fault for chat_provider_errors_total: ``4xx``/``5xx`` (the
    HTTP status class of an error answer), ``timeout``, ``dropped`` (the connection was
    lost), ``malformed`` (a chunk that is not a JSON object), ``error_event`` (an
    ``{"error": ...}`` event in the stream); None for an exception that is not the
    provider's (a bug)."""
    if isinstance(exc, openai.APIStatusError):
        return f"{exc.status_code // 100}xx"
    if isinstance(exc, UpstreamTimeout | openai.APITimeoutError | httpx2.TimeoutException):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError | httpx2.RequestError | ssl.SSLError
                  | anyio.EndOfStream):
        return "dropped"
    if isinstance(exc, json.JSONDecodeError):
        return "malformed"
    if isinstance(exc, UpstreamFailure | openai.APIError):
        return "error_event"
    return None


def _stream_error(payload: dict) -> UpstreamFailure:
    """The failure of an ``{"error": ...}`` event in the stream (the SDK's wording)."""
    error = payload.get("error")
    message = error.get("message") if isinstance(error, dict) else None
    if not message or not isinstance(message, str):
        message = "An error occurred during streaming"
    return UpstreamFailure(
        f"The model provider reported an error: {_provider_message(message)}"
    )


async def _events(client, model, messages, max_tokens, label, meta: StreamMeta
                  ) -> AsyncIterator[StreamEvent]:
    first_byte_s = settings.OPENAI_FIRST_BYTE_TIMEOUT_S
    idle_s = settings.CHAT_STREAM_IDLE_TIMEOUT_S
    base_url = providers.base_url_of(client)
    # `async with` closes the HTTP response on every exit, including a CancelledError
    # or GeneratorExit raised at any await or yield inside the block.
    async with contextlib.AsyncExitStack() as stack:
        try:
            # Entering returns once the response headers are in; the profile's one-time
            # probe of a server, the SDK's retries and our one retry after a refused
            # optional parameter all spend the same budget.
            async with asyncio.timeout(first_byte_s):
                profile = await providers.resolve(client)
                body = profile.request_body(model, messages, max_tokens)
                response, body = await _open(stack, client, base_url,
                                             providers.adapted_body(base_url, body))
        except TimeoutError:
            raise UpstreamTimeout(
                f"The model provider did not start answering within {first_byte_s:g} s."
            ) from None
        http = response.http_response
        meta.hang_up = functools.partial(netstream.hang_up, http)
        # Runs before the response is closed (the stack unwinds last in, first out).
        stack.callback(setattr, meta, "hang_up", None)
        meta.profile, meta.hidden_reasoning = profile.name, profile.hides_reasoning(model)
        meta.usage_requested = "stream_options" in body
        reasoning_keys = profile.reasoning_keys
        meta.generation_id = _provider_message(http.headers.get("x-generation-id"), 100)
        finish_reason, usage, batching = "", None, False
        lines = sse.data_of(http)
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
                return
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
                await sse.drain(lines, _DRAIN_S)
                return
            chunk = sse.parse(data)
            if not isinstance(chunk, dict):
                raise json.JSONDecodeError("a chunk is not a JSON object", "", 0)
            if chunk.get("error"):
                raise _stream_error(chunk)
            if not meta.generation_id and isinstance(chunk.get("id"), str):
                meta.generation_id = _provider_message(chunk["id"], 100)
            event = _read_chunk(chunk, reasoning_keys)
            if not batching and (event.content or event.reasoning):
                # The first text went out per chunk (TTFT); the rest comes in read ticks.
                batching = True
                netstream.batch_reads(http)
            finish_reason = event.finish_reason or finish_reason
            usage = event.usage if event.usage is not None else usage
            yield event


async def _open(stack: contextlib.AsyncExitStack, client, base_url: str, body: dict):
    """Send the request; ``(response, body sent)`` once the server accepts it (its
    headers in). The SDK sends it (auth, retries on 429/5xx and dropped
    connections, HTTP errors as APIStatusError) and hands back the raw response: its
    chunks are parsed here with orjson, not turned into SDK objects (issue 11: that cost
    half the worker's CPU). A 400 naming an optional parameter is retried once without
    it (chat.generation.providers.adapt_after)."""
    for attempt in (1, 2):
        request = client.chat.completions.with_streaming_response.create(**body)
        try:
            response = await stack.enter_async_context(request)
        except openai.APIStatusError as exc:
            retry = providers.adapt_after(base_url, exc, body) if attempt == 1 else None
            if retry is None:
                raise
            body = retry
            continue
        return response, body
    raise AssertionError("unreachable")
