"""Tuning constants of the streaming path, overridable as a whole by ``CHAT_TUNING``.

These are not settings an operator needs: their defaults were measured for this app
(docs/performance.md, docs/scale.md) and each says where it is used and why. A
benchmark or a test may still change them, through ONE variable holding a JSON object::

    CHAT_TUNING='{"read_tick_ms": 60, "checkpoint_ms": 500}'

which ``chatproject/settings.py`` parses with :func:`parse` into ``settings.CHAT_TUNING``
(a :class:`Tuning`). Code reads ``settings.CHAT_TUNING.<name>`` when it needs the value,
so a test overrides one with ``settings.CHAT_TUNING = settings.CHAT_TUNING.replace(...)``.

This module imports nothing from Django: the settings module imports it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class Tuning:
    """The tuning constants; every value is a non-negative number in the unit its name
    ends with (``_ms``, ``_s``) or a count."""

    # --- the upstream stream (chat.generation.providers: chat_completions, netstream) ---
    # After the answer's first text, a run's reader is woken this long after its first
    # unread chunk, with every chunk of that time, instead of once per chunk (ms; 0: per
    # chunk): one task step, one delta frame and one socket write per batch instead of
    # per token. A stop still returns what was received before it closes the stream.
    read_tick_ms: int = 80

    # The openai SDK's own timeout of each read and write (s): a backstop behind
    # OPENAI_FIRST_BYTE_TIMEOUT_S and CHAT_STREAM_IDLE_TIMEOUT_S, which end a silent
    # provider first.
    sdk_timeout_s: float = 60.0

    # --- deltas (chat.generation.task) ---
    # Deltas are coalesced over this window (ms) on top of the read tick; 0: a delta
    # per read batch, as it is read.
    delta_coalesce_ms: int = 0
    # ... and sent at once, whatever the window, when this many characters are pending.
    delta_max_chars: int = 2000

    # --- back-pressure (chat.generation.task, chat.generation.fanout) ---
    # Frames a generation may queue for the channel layer before it waits for them to
    # be sent.
    outbox_limit: int = 64
    # Frames one socket may have waiting; past it the socket drops them and
    # resynchronises from a fresh state frame instead of holding more.
    inbox_limit: int = 1000

    # --- admission control (chat.generation.admission; docs/scale.md) ---
    # Refuse new generations while this many starts wait for their transaction (0: no
    # limit) ...
    max_pending_starts: int = 0
    # ... or while a start admitted now would wait longer than this for its
    # transaction (ms; 0: off): the time to first token a burst of starts may take to
    # drain; a queue that drains sooner is no overload.
    max_start_wait_ms: int = 3000
    # ... or while the event loop runs late by more than this, standing, on average
    # (ms; 0: off).
    max_loop_lag_ms: int = 50
    # A refused client is told to retry after this long (ms, times 1 to 1.5 at random).
    overload_retry_ms: int = 2000

    # --- saving and crash recovery (chat.generation.leases, checkpoints, store) ---
    # A streaming answer is written to the database at least this often (ms).
    checkpoint_ms: int = 1000
    # A `streaming` message whose heartbeat is older than this (s) belongs to a dead
    # process and is marked interrupted.
    lease_s: float = 15.0
    # Every worker looks for expired leases this often (s, jittered +-50%; 0: never).
    sweep_s: float = 5.0

    # --- the repetition guard (chat.generation.autostop; README, "Automatic stops") ---
    # It stops an answer when the same `repetition_ngram` words in a row occur more
    # than `repetition_max_repeats` times within its last `repetition_window` words, or
    # the same non-empty line comes more than `repetition_max_line_repeats` times in a
    # row.
    repetition_ngram: int = 8
    repetition_max_repeats: int = 5
    repetition_window: int = 400
    repetition_max_line_repeats: int = 5

    # --- usage after a run (chat.generation.counting) ---
    # How long the provider's tokenizer (llama.cpp/vLLM POST /tokenize) may take to
    # count a run without usage (s); past it the usage is estimated.
    tokenize_timeout_s: float = 2.0
    # OpenRouter's record of a generation appears a few seconds after it ends: first
    # ask after this long (s), doubling, for this long in all (s).
    usage_lookup_first_delay_s: float = 1.0
    usage_lookup_window_s: float = 60.0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            wanted = int if field.type == "int" else (int, float)
            if isinstance(value, bool) or not isinstance(value, wanted) or value < 0:
                kind = "integer" if field.type == "int" else "number"
                raise ValueError(
                    f"CHAT_TUNING: {field.name}={value!r} must be a non-negative {kind}")

    def replace(self, **changes) -> Tuning:
        """A copy with ``changes``; raises ValueError for an unknown name or a value of
        the wrong type (as :func:`parse`)."""
        _refuse_unknown(changes)
        return dataclasses.replace(self, **changes)


def names() -> list[str]:
    """The tuning constants' names, in declaration order."""
    return [field.name for field in dataclasses.fields(Tuning)]


def _refuse_unknown(values: dict) -> None:
    unknown = sorted(set(values) - set(names()))
    if unknown:
        raise ValueError(
            f"CHAT_TUNING: unknown name(s) {', '.join(unknown)}; known: {', '.join(names())}")


def parse(text: str) -> Tuning:
    """The :class:`Tuning` that ``text`` (``CHAT_TUNING``: a JSON object of overrides,
    or empty for the defaults) describes. Raises ValueError naming ``CHAT_TUNING`` when
    it is not a JSON object, names an unknown constant, or gives a value that is not a
    non-negative number (an integer for the integer ones)."""
    if not text.strip():
        return Tuning()
    try:
        values = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"CHAT_TUNING is not valid JSON: {exc}") from None
    if not isinstance(values, dict):
        raise ValueError(f"CHAT_TUNING must be a JSON object, not {text!r}")
    _refuse_unknown(values)
    return Tuning(**values)


# Environment variables that were settings before these constants were gathered here:
# a deployment that still sets one is told which constant it became (chat.checks).
FORMER_VARIABLES = {
    "OPENAI_TIMEOUT_S": "sdk_timeout_s",
    "CHAT_UPSTREAM_READ_TICK_MS": "read_tick_ms",
    "CHAT_DELTA_COALESCE_MS": "delta_coalesce_ms",
    "CHAT_DELTA_MAX_CHARS": "delta_max_chars",
    "CHAT_OUTBOX_LIMIT": "outbox_limit",
    "CHAT_INBOX_LIMIT": "inbox_limit",
    "CHAT_MAX_PENDING_STARTS": "max_pending_starts",
    "CHAT_MAX_START_WAIT_MS": "max_start_wait_ms",
    "CHAT_MAX_LOOP_LAG_MS": "max_loop_lag_ms",
    "CHAT_OVERLOAD_RETRY_MS": "overload_retry_ms",
    "CHAT_CHECKPOINT_MS": "checkpoint_ms",
    "CHAT_LEASE_S": "lease_s",
    "CHAT_SWEEP_S": "sweep_s",
    "CHAT_REPETITION_NGRAM": "repetition_ngram",
    "CHAT_REPETITION_MAX_REPEATS": "repetition_max_repeats",
    "CHAT_REPETITION_WINDOW": "repetition_window",
    "CHAT_REPETITION_MAX_LINE_REPEATS": "repetition_max_line_repeats",
    "CHAT_TOKENIZE_TIMEOUT_S": "tokenize_timeout_s",
    "CHAT_USAGE_LOOKUP_FIRST_DELAY_S": "usage_lookup_first_delay_s",
    "CHAT_USAGE_LOOKUP_WINDOW_S": "usage_lookup_window_s",
}
