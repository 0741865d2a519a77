"""Why a generation could not start: each error with its ``error`` frame code and the
HTTP status the REST API answers with (README, "Error codes"; docs/api.md).

Imports nothing of chat/ but the frames module (a leaf), so every layer may raise them.
"""

from __future__ import annotations

from . import frames


class GenerationError(Exception):
    """A generation could not start; nothing was saved. ``code`` is the error frame's
    code, ``http_status`` the REST API's status; ``extra`` goes into the frame."""

    code = "error"
    http_status = 400

    def __init__(self, detail: str, **extra):
        super().__init__(detail)
        self.detail = detail
        self.extra = extra

    def to_frame(self) -> dict:
        """The ``error`` frame for the socket that asked."""
        return frames.error(self.code, self.detail, **self.extra)

    def http_headers(self) -> dict[str, str]:
        """Extra headers of the REST API's error response (none but for Overloaded)."""
        return {}


class Busy(GenerationError):
    """A generation already runs in this conversation (``busy``; HTTP 409)."""

    code = "busy"
    http_status = 409


class Forbidden(GenerationError):
    """The conversation belongs to another user (``forbidden``; HTTP 404: as if it did
    not exist)."""

    code = "forbidden"
    http_status = 404


class InvalidRequest(GenerationError):
    """Empty, too long or otherwise unusable input (``invalid``; HTTP 400)."""

    code = "invalid"
    http_status = 400


class QuotaExceeded(GenerationError):
    """Over the user's token/USD budget (``quota_exceeded``; HTTP 429); chat.generation.budgets."""

    code = "quota_exceeded"
    http_status = 429


class ConcurrencyLimit(Busy):
    """The user already runs ``max_concurrent`` generations (``concurrency_limit``; the
    frame also carries ``limit`` and ``running``); chat.generation.budgets.

    HTTP 429 Too Many Requests (RFC 6585, section 4): the request is fine, the user has
    too many running. (Until the status map moved here it fell through to 400.)"""

    code = "concurrency_limit"
    http_status = 429


class Overloaded(GenerationError):
    """This worker refuses new generations to keep its running ones on time
    (``overloaded``; chat.generation.admission). ``extra``: ``retry_after_ms`` (the
    hint, ms) and ``reason`` (``streams``, ``starts``, ``lag``, ``busy`` or
    ``shutting_down``: the worker drains, chat.generation.drain).

    HTTP 503 Service Unavailable with ``Retry-After`` in whole seconds, rounded up (RFC
    9110, sections 15.6.4 and 10.2.3): the server is temporarily unable to handle the
    request, the client may repeat it later (unlike 429, not the client's doing)."""

    code = "overloaded"
    http_status = 503

    def http_headers(self) -> dict[str, str]:
        """``Retry-After``: delay-seconds, the hint rounded up to a whole second."""
        return {"Retry-After": str(max(1, -(-int(self.extra.get("retry_after_ms", 1000)) // 1000)))}


class UpstreamFailure(Exception):
    """A run failed because of its provider (HTTP error, timeout, lost connection,
    malformed chunk, an error event); ``str(exc)`` is the clean, user-facing text
    (provider text sanitized and the API key masked by chat.generation.providers)."""


class HungUp(UpstreamFailure):
    """The stream ended because this process closed its connection (a stop, a
    handover to another worker: ``StreamMeta.hang_up``), not by a provider fault: it
    is not counted as a provider error."""


class UpstreamIncomplete(UpstreamFailure):
    """The provider's body ended cleanly before the answer did: no ``finish_reason``
    (Chat Completions) or terminal event (Responses API) came, so a provider or a proxy
    cut it short. Counted as a ``dropped`` stream (chat_provider_errors_total)."""

    def __init__(self, message: str = "The model provider ended the answer before it "
                                      "was complete."):
        super().__init__(message)


class UpstreamTimeout(UpstreamFailure):
    """The provider did not start answering, or went silent, for too long (the
    message says which; settings OPENAI_FIRST_BYTE_TIMEOUT_S, CHAT_STREAM_IDLE_TIMEOUT_S)."""
