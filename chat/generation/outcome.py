"""How a run ended: the one value the run produces and ``store.finalize`` consumes.

Every way a run can end (completed, stopped, the provider failing, this process
ending it, a bug) maps to one :class:`Outcome` in :func:`outcome_of`, the only place
that decides a run's status, finish_reason and error text.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace

from ..models import Message
from .autostop import finish_reason_for
from .errors import UpstreamFailure

logger = logging.getLogger(__name__)

SHUTDOWN_ERROR = "The server restarted before the answer was complete."


@dataclass(frozen=True)
class Outcome:
    """The end of one run.

    ``status``: a final ``Message.Status``; ``finish_reason``: the provider's
    (``stop``, ``length``, ...), ``cancelled``/``error``, or the automatic stop that
    ended it (``repetition``, ``cost_limit``; chat.generation.autostop); ``error``:
    shown to the user ("" for none); ``usage``: ``{"prompt_tokens",
    "completion_tokens", "reasoning_tokens", "cached_tokens"}`` as the provider
    reported it in its final usage, or None; ``running_usage``: the provider's last
    running count of the same shape (vLLM ``continuous_usage_stats``), or None;
    ``tokenized``: ``{"prompt_tokens", "completion_tokens"}`` counted by the server's
    own tokenizer after the run, or None; store.finalize takes the first of the three
    that is set, else estimates (UsageRecord.source). ``reasoning_hidden``: the
    provider bills reasoning it does not stream (StreamMeta.hidden_reasoning).
    ``ttft_ms``: ms from the request to the first text (None if none came);
    ``duration_ms``: ms of the run.
    """

    status: str
    finish_reason: str
    error: str = ""
    usage: dict | None = None
    ttft_ms: int | None = None
    duration_ms: int = 0
    running_usage: dict | None = None
    tokenized: dict | None = None
    reasoning_hidden: bool = False

    def with_timing(self, *, usage, ttft_ms, duration_ms) -> Outcome:
        """The same end with what was measured during the run."""
        return replace(self, usage=usage, ttft_ms=ttft_ms, duration_ms=duration_ms)

    def with_counts(self, *, running_usage=None, tokenized=None,
                    reasoning_hidden=False) -> Outcome:
        """The same end with the fallbacks of a missing final usage (see the class)."""
        return replace(self, running_usage=running_usage, tokenized=tokenized,
                       reasoning_hidden=reasoning_hidden)

    def failed(self, error: str) -> Outcome:
        """The same run ended as ``failed`` with ``error`` (its save failed)."""
        return replace(self, status=Message.Status.FAILED, finish_reason="error", error=error)


def outcome_of(
    exc: BaseException | None, *, finish_reason: str, failure: str | None, message_id: str,
    cancel_reason: str | None = None,
) -> Outcome:
    """The outcome of a run whose stream loop ended with ``exc`` (None: the stream
    ended by itself) after seeing ``finish_reason`` ("" if none). ``failure`` is the
    error this process ended the run with (Generation.fail), which turns a
    cancellation into ``failed``; ``cancel_reason`` (Generation.cancel_reason) names an
    automatic stop that cancelled it, whose rule becomes the finish_reason. Usage and
    timings are added by the caller: a usage the provider reported is kept whatever the
    end (it is what was billed)."""
    if exc is None:
        if finish_reason:
            return Outcome(Message.Status.COMPLETED, finish_reason)
        # A clean end of the HTTP body without a finish_reason: the provider (or a
        # proxy) cut the answer short.
        return Outcome(Message.Status.FAILED, "error",
                       "The model provider ended the answer before it was complete.")
    if isinstance(exc, asyncio.CancelledError):
        if failure is None and cancel_reason == "shutdown":
            # The worker's drain grace ended (chat.generation.drain): as a lost lease.
            return Outcome(Message.Status.INTERRUPTED, "error", SHUTDOWN_ERROR)
        if failure is None:
            # autostop hook: `repetition`/`cost_limit` when a rule stopped it.
            return Outcome(Message.Status.CANCELLED, finish_reason_for(cancel_reason))
        return Outcome(Message.Status.FAILED, "error", failure)
    if isinstance(exc, UpstreamFailure):
        return Outcome(Message.Status.FAILED, "error", str(exc))
    logger.error("generation %s failed", message_id, exc_info=exc)
    return Outcome(Message.Status.FAILED, "error",
                   f"The generation failed ({type(exc).__name__}).")
