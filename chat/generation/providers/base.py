"""The provider interface: what the run asks of a model provider, whatever its API.

A :class:`Provider` turns one :class:`StreamRequest` into :class:`StreamEvent` values
(its SDK objects and wire format stay inside its module), fills in the run's
:class:`StreamMeta` as it reads, and maps every fault of the provider to
:class:`~chat.generation.errors.UpstreamFailure`. Everything past the stream is
optional and has a default that says "not offered": counting tokens with the server's
tokenizer, the provider's usage record after the run, a cancel the provider confirms,
and resuming a cut stream. chat.generation.providers chooses one by name
(``OPENAI_API``); docs/architecture.md, "Adding a provider", lists the steps.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

from django.conf import settings

from ... import metrics
from ..errors import HungUp, UpstreamFailure, UpstreamIncomplete, UpstreamTimeout
from .text import MIN_KEY_CHARS, KeyMask


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """What one read of the stream said, cleaned (at most one per provider chunk).

    - ``content``: visible answer text (may be "");
    - ``reasoning``: reasoning ("thinking") text the provider streams beside the
      answer, may be "";
    - ``finish_reason``: "" until the provider gives one (``stop``, ``length``,
      ``content_filter``, ...); at most 32 chars;
    - ``usage``: the provider's final usage, or None: ``{"prompt_tokens",
      "completion_tokens", "reasoning_tokens", "cached_tokens"}``, non-negative ints
      (reasoning is part of completion, cached part of prompt; 0 when not reported);
    - ``running_usage``: a running count of the same shape sent before the end
      (vLLM/SGLang ``stream_options.continuous_usage_stats``), or None.
    """

    content: str = ""
    reasoning: str = ""
    finish_reason: str = ""
    usage: dict | None = None
    running_usage: dict | None = None


@dataclass(frozen=True, slots=True)
class StreamRequest:
    """One answer to ask for: ``model`` (the provider's model name), ``messages``
    (``[{"role", "content"}]``, the system prompt first), ``max_tokens`` (the cap on
    the answer's tokens, reasoning included where the provider bills it so) and
    ``label`` (the assistant message id: names the run in logs)."""

    model: str
    messages: list[dict]
    max_tokens: int
    label: str = ""


@dataclass(slots=True)
class StreamMeta:
    """What the run learns about its stream beside the events, filled in by the
    provider as it reads (ids and flags are per stream, not per event, so the hot path
    builds no extra object); read when the run stops or ends.

    - ``provider``: the registry name of the provider (``chat``);
    - ``profile``: the dialect of the server (``openai``, ``vllm``, ``ollama``,
      ``llamacpp``, ``openrouter``, ``deepseek``, ``generic``);
    - ``generation_id``: the provider's id of this answer (the id a later
      :meth:`Provider.cancel`, :meth:`Provider.resume` or
      :meth:`Provider.usage_after` takes), "" if none;
    - ``sequence``: the sequence number of the last event yielded, for a provider whose
      events are numbered (the ``after_sequence`` of :meth:`Provider.resume`); -1 if
      none;
    - ``usage_requested``: False when the server could not be asked for usage (then the
      run's usage is estimated or tokenized);
    - ``hidden_reasoning``: True when the provider bills reasoning tokens it does not
      stream, so a stopped run's estimate undercounts them;
    - ``hang_up``: while the response is open, closes its connection at once, so a stop
      reaches the provider before the reading task's next step; None before the
      response is open and once it is closed;
    - ``held``: True while key masking (:class:`StreamMasks`) holds back text of the
      events yielded so far: their ``sequence`` is then no resume point for the text
      yielded (a worker resuming after it would never get the held text).
    """

    provider: str = ""
    profile: str = "generic"
    generation_id: str = ""
    sequence: int = -1
    usage_requested: bool = True
    hidden_reasoning: bool = False
    hang_up: Callable[[], None] | None = None
    held: bool = False


class StreamMasks:
    """The key masks of one stream's answer and reasoning text (:class:`KeyMask`)."""

    __slots__ = ("content", "reasoning")

    def __init__(self, key: str):
        self.content, self.reasoning = KeyMask(key), KeyMask(key)

    @classmethod
    def for_key(cls, key: str | None) -> StreamMasks | None:
        """The masks for ``key``; None when it is too short to mask (or unset)."""
        return cls(key) if key and len(key) >= MIN_KEY_CHARS else None

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
        return replace(event, content=content, reasoning=reasoning)

    @property
    def holding(self) -> bool:
        """True when text of either kind is held back."""
        return self.content.holding or self.reasoning.holding

    def flush(self) -> StreamEvent | None:
        """An event of the text still held (the stream ended), or None."""
        if not (self.content.holding or self.reasoning.holding):
            return None
        return StreamEvent(content=self.content.flush(), reasoning=self.reasoning.flush())



class Provider:
    """A model provider's API, for the runs of one event loop and one configuration.

    Subclasses set :attr:`name` (their key in chat.generation.providers.PROVIDERS) and
    implement :meth:`stream`; the other methods default to "not offered". An instance
    holds the connection pool of one event loop (chat.generation.runtime.Runtime makes
    one per loop and :meth:`key`).
    """

    name = ""
    #: :meth:`cancel` asks the provider to stop an answer it keeps generating.
    can_cancel = False
    #: :meth:`resume` continues a stream cut before its end.
    can_resume = False

    def __init__(self, base_url: str | None, api_key: str):
        self.base_url, self.api_key = base_url, api_key

    @classmethod
    def key(cls, base_url: str | None, api_key: str) -> tuple:
        """What makes two instances interchangeable (the key only hashed)."""
        return (cls.name, base_url, hash(api_key))

    def stream(self, request: StreamRequest, meta: StreamMeta) -> AsyncIterator[StreamEvent]:
        """The events of one answer until the provider ends it.

        Raises UpstreamFailure (UpstreamTimeout: no answer within
        OPENAI_FIRST_BYTE_TIMEOUT_S, or silence for CHAT_STREAM_IDLE_TIMEOUT_S) for
        every fault of the provider; other exceptions are bugs. The caller closes the
        iterator (``contextlib.aclosing``) on every exit, and closing it must close the
        connection: that is how a stop reaches the provider."""
        raise NotImplementedError

    async def count_tokens(self, meta: StreamMeta, model: str, text: str) -> int | None:
        """How many tokens ``text`` is by the server's own tokenizer, or None (not
        offered, or any failure). Never raises; called after the stream is closed."""
        return None

    def wants_usage_after(self, meta: StreamMeta) -> bool:
        """True when :meth:`usage_after` may give the usage of this stream's answer."""
        return False

    async def usage_after(self, meta: StreamMeta) -> dict | None:
        """The provider's own record of the answer once its stream is over:
        ``{"prompt_tokens", "completion_tokens", "reasoning_tokens", "cached_tokens"}``
        and optionally ``"cost_usd"`` (a Decimal), or None while it has none (the
        caller retries with backoff). Never raises."""
        return None

    async def cancel(self, response_id: str) -> dict | None:
        """Ask the provider to stop generating ``response_id`` (when
        :attr:`can_cancel`); the usage of what it generated, shaped as
        :meth:`usage_after`'s, or None. Never raises."""
        return None

    def resume(self, request: StreamRequest, meta: StreamMeta, response_id: str,
               after_sequence: int) -> AsyncIterator[StreamEvent]:
        """The events of ``response_id`` after ``after_sequence`` (when
        :attr:`can_resume`), then the live ones, as :meth:`stream` yields them."""
        raise NotImplementedError


def uses_demo_model() -> bool:
    """True when neither OPENAI_API_KEY nor OPENAI_BASE_URL is set."""
    return not settings.OPENAI_API_KEY and not settings.OPENAI_BASE_URL


async def guarded(
    events: AsyncIterator[StreamEvent], *, model: str, key: str | None,
    classify: Callable[[Exception], tuple[str | None, UpstreamFailure | None]],
    meta: StreamMeta | None = None,
) -> AsyncIterator[StreamEvent]:
    """``events`` with the API ``key`` masked in their text (a proxy may echo it, and a
    chunk may split it: :class:`StreamMasks`) and every
    provider fault counted (chat_provider_errors_total) and raised as UpstreamFailure.

    ``classify(exc)`` gives a provider's own exception its ``(kind, failure)``:
    ``kind`` one of ``4xx``, ``5xx``, ``timeout``, ``dropped``, ``malformed``,
    ``error_event``; ``(None, None)`` for an exception that is not the provider's (a
    bug: it passes through). An UpstreamFailure raised by the reader passes through as
    is; a HungUp (this process closed the connection) is not counted. The text
    received before a failure is yielded whole first. ``meta.held`` says after each
    event whether text is held back."""
    masks = StreamMasks.for_key(key)
    try:
        async for event in events:
            if masks is None:
                yield event
                continue
            event = masks.event(event)
            if meta is not None:
                meta.held = masks.holding
            yield event
    except Exception as exc:
        if isinstance(exc, UpstreamFailure):
            kind = ("timeout" if isinstance(exc, UpstreamTimeout) else
                    "dropped" if isinstance(exc, UpstreamIncomplete) else "error_event")
            failure = exc
        else:
            kind, failure = classify(exc)
        if not isinstance(exc, HungUp):  # our own hang-up is no provider fault
            metrics.provider_error(model, kind)
        if failure is None:
            raise
        if masks is not None and (tail := masks.flush()) is not None:
            yield tail  # the text received before the failure is kept whole
        if failure is exc:
            raise
        raise failure from exc
    if masks is not None and (tail := masks.flush()) is not None:
        yield tail
