"""The provider: its client, the request, and the reading of one stream into
:class:`StreamEvent` values. The runtime never touches SDK objects: provider
differences (and the SDK itself) stay in this module.

Reading goes through the ``openai`` SDK today. A raw SSE parser would replace
:func:`_read_chunk` and the iteration in :func:`stream_answer`, producing the same
events and raising the same :class:`UpstreamFailure` texts.

Provider output is untrusted input: text is cleaned here (:func:`clean_provider_text`),
usage counts are checked, and the API key is masked in any provider message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

import openai
from django.conf import settings

from .errors import UpstreamFailure, UpstreamTimeout

logger = logging.getLogger(__name__)

# After finish_reason and usage, how long (s) to wait for [DONE] before ending the run as
# completed anyway (at most CHAT_STREAM_IDLE_TIMEOUT_S). Providers send [DONE] in the same
# write as the usage chunk; the wait only keeps the connection reusable.
_DONE_GRACE_S = 2.0


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
      stream (OpenAI reasoning models), so a stopped run's estimate undercounts them.
    """

    profile: str = "generic"
    generation_id: str = ""
    usage_requested: bool = True
    hidden_reasoning: bool = False


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
    return openai.AsyncOpenAI(api_key=api_key, base_url=base_url, timeout=timeout,
                              max_retries=settings.OPENAI_MAX_RETRIES)


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
    joins escaped pairs.
    """
    if not _UNSAFE_TEXT.search(text):
        return text
    return _UNSAFE_TEXT.sub(lambda m: "" if m.group() == "\x00" else "\ufffd", text)


def _provider_message(value, limit: int = 300) -> str:
    """A provider's message (any JSON value) as clean text of at most ``limit`` chars;
    the configured API key is masked should a provider or proxy echo it."""
    text = clean_provider_text(str(value or "").strip())
    key = settings.OPENAI_API_KEY
    if key and len(key) >= 8:
        text = text.replace(key, "***")
    return text[:limit]


def _reported_usage(usage) -> dict | None:
    """``{"prompt_tokens", "completion_tokens"}`` from a chunk's ``usage``, or None when
    it is missing or not two non-negative integers (then the tokens are estimated)."""
    if usage is None:
        return None
    counts = {}
    for name in ("prompt_tokens", "completion_tokens"):
        value = usage.get(name) if isinstance(usage, dict) else getattr(usage, name, None)
        # Above 10**9 a count is not believable, and would overflow UsageRecord's fields.
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10**9:
            return None
        counts[name] = value
    return counts


def _read_chunk(chunk) -> StreamEvent:
    """The event of one streamed chunk (an SDK object), all cleaned.

    Tolerates what real providers send beside the reference format: no ``choices``
    (Azure's prompt-filter chunks), ``choices: null`` (some usage chunks), a choice
    without ``delta``, non-string content.
    """
    content: list[str] = []
    finish_reason = ""
    for choice in getattr(chunk, "choices", None) or ():
        delta = getattr(choice, "delta", None)
        text = getattr(delta, "content", None)
        if isinstance(text, str) and text:
            content.append(clean_provider_text(text))
        reason = getattr(choice, "finish_reason", None)
        if reason:
            finish_reason = _provider_message(reason, 32)
    return StreamEvent(content="".join(content), finish_reason=finish_reason,
                       usage=_reported_usage(getattr(chunk, "usage", None)))


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
    return str(message or exc.message)[:300]


def _failure(exc: Exception, label: str) -> UpstreamFailure | None:
    """The user-facing failure of an SDK exception; None for one that is not the
    provider's (a bug: the run reports its type)."""
    if isinstance(exc, openai.APIStatusError):
        return UpstreamFailure(
            f"The model provider answered HTTP {exc.status_code}: "
            f"{_provider_message(_api_message(exc))}{_retry_hint(exc)}"
        )
    if isinstance(exc, openai.APITimeoutError):
        return UpstreamFailure("The model provider did not answer in time.")
    if isinstance(exc, openai.APIConnectionError):
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
    label: str,
) -> AsyncIterator[StreamEvent]:
    """Request a streamed chat completion and yield its events until the provider ends
    the answer; ``label`` (the message id) names the run in logs.

    Raises UpstreamFailure (UpstreamTimeout: no headers within
    OPENAI_FIRST_BYTE_TIMEOUT_S, or nothing for CHAT_STREAM_IDLE_TIMEOUT_S) for every
    fault of the provider; other exceptions are bugs and pass through. Use it inside
    ``contextlib.aclosing``: the HTTP response is closed when the generator is, so a
    cancellation at any await of the caller closes the connection and the provider
    stops generating.
    """
    try:
        async for event in _events(client, model, messages, max_tokens, label):
            yield event
    except Exception as exc:
        failure = _failure(exc, label)
        if failure is None:
            raise
        raise failure from exc


async def _events(client, model, messages, max_tokens, label) -> AsyncIterator[StreamEvent]:
    first_byte_s = settings.OPENAI_FIRST_BYTE_TIMEOUT_S
    idle_s = settings.CHAT_STREAM_IDLE_TIMEOUT_S
    try:
        # create() returns once the response headers are in; the SDK's retries (429,
        # 5xx, a dropped connection) spend the same budget.
        async with asyncio.timeout(first_byte_s):
            stream = await client.chat.completions.create(
                model=model, messages=messages, stream=True,
                stream_options={"include_usage": True}, max_tokens=max_tokens,
            )
    except TimeoutError:
        raise UpstreamTimeout(
            f"The model provider did not start answering within {first_byte_s:g} s."
        ) from None
    finish_reason, usage = "", None
    # `async with` closes the HTTP response on every exit, including a CancelledError
    # or GeneratorExit raised at any await or yield inside the block.
    async with stream:
        chunks = aiter(stream)
        while True:
            # Once finish_reason and usage are both in, the answer is whole: [DONE] gets
            # a short grace, and whatever follows (silence, a cut connection, garbage)
            # cannot turn it into a failure.
            whole = bool(finish_reason) and usage is not None
            try:
                async with asyncio.timeout(min(_DONE_GRACE_S, idle_s) if whole else idle_s):
                    chunk = await anext(chunks)
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
            event = _read_chunk(chunk)
            finish_reason = event.finish_reason or finish_reason
            usage = event.usage if event.usage is not None else usage
            yield event
