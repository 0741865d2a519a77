"""Automatic stops: the server stops an answer itself, exactly as a ``stop`` frame would
(upstream closed at once, text kept, status ``cancelled``), when

- it degenerates into a loop: ``finish_reason`` ``repetition`` (:class:`RepetitionGuard`);
- its running cost reaches a ceiling: ``finish_reason`` ``cost_limit`` (:class:`CostCeiling`).

Both are opt-in: per deployment (``CHAT_REPETITION_GUARD`` and its tunables,
``CHAT_MAX_ANSWER_USD``, ``CHAT_MAX_ANSWER_TOKENS``), per user
(``UserBudget.max_answer_usd``, set in the admin) and per conversation
(``Conversation.repetition_guard``, null: the deployment's choice; ``max_answer_usd``,
``max_answer_tokens``: REST PATCH, or the first ``message`` frame).

The tightest ceiling applies, so neither a user nor a conversation can loosen the
deployment's or the budget's. :class:`AutoStop` is the policy of one run, built in
``chat.generation.store._prepare`` (inside its transaction) and consulted by the run after
every chunk with the chunk's text: O(that text) per chunk, never a rescan of the answer.
With a ceiling, the budget check reserves only what the answer may cost before the
ceiling stops it (:meth:`AutoStop.reserve`) instead of the whole ``max_tokens``.
"""

from __future__ import annotations

import math
import re
from collections import Counter, deque
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

from django.conf import settings

from .. import accounting
from ..models import UserBudget
from ..money import format_usd
from .budgets import READ as _READ_BUDGET
from .errors import InvalidRequest, QuotaExceeded

# finish_reason of the runs these rules stop (Message.finish_reason, generation.end).
REPETITION = "repetition"
COST_LIMIT = "cost_limit"
STOP_REASONS = (REPETITION, COST_LIMIT)

# Conversation fields that set a conversation's automatic stops (REST API, `message`).
CONVERSATION_FIELDS = ("repetition_guard", "max_answer_usd", "max_answer_tokens")
# Bounds of those fields; USD amounts have at most 6 whole digits and 8 decimals
# (Conversation.max_answer_usd, max_digits=14, decimal_places=8).
USD_PATTERN = r"^[0-9]{1,6}(\.[0-9]{1,8})?$"
MAX_ANSWER_TOKENS_LIMIT = 1_000_000

# Who stopped a cancelled run (Generation.cancel_reason), as the end-of-run log says it.
STOPPED_BY = {
    "stop": "stop frame",
    "disconnect": "client disconnect",
    "teardown": "socket torn down by the server",
    "shutdown": "the end of the drain grace (worker stopping)",
    "lease_lost": "lease lost",
    "failed": "the server (text could not be saved)",
    REPETITION: "repetition guard",
    COST_LIMIT: "cost ceiling",
}


def finish_reason_for(cancel_reason: str | None) -> str:
    """The ``finish_reason`` of a cancelled run: the rule's name when an automatic stop
    cancelled it (``repetition``, ``cost_limit``), else ``cancelled``."""
    return cancel_reason if cancel_reason in STOP_REASONS else "cancelled"


def describe_end(finish_reason: str, cancel_reason: str | None) -> str:
    """The end of a run for the log: ``finish_reason=stop`` for a completed run, and
    what stopped a cancelled one, e.g. ``finish_reason=cancelled, stopped by stop frame``
    or ``finish_reason=repetition, stopped by repetition guard``."""
    text = f"finish_reason={finish_reason}"
    if cancel_reason:
        text += f", stopped by {STOPPED_BY.get(cancel_reason, cancel_reason)}"
    return text


# --- the repetition guard ---------------------------------------------------------------
@dataclass(frozen=True)
class RepetitionRule:
    """When an answer counts as looping. Units are words: runs of non-white-space
    characters holding a letter or digit (markdown rules such as ``|``, ``---`` or
    ``*`` and list markers such as ``3.`` are not words); each Chinese character or
    kana is a word; other text without white space is cut into words of
    :data:`MAX_WORD_CHARS` characters.

    - ``ngram`` words in a row that occur more than ``max_repeats`` times within the
      last ``window`` words;
    - or the same non-empty line (trimmed, its list marker left out) more than
      ``max_line_repeats`` times in a row (blank lines in between do not count).

    Defaults (``settings.CHAT_TUNING``, chat.tuning: ``repetition_ngram`` 8,
    ``repetition_max_repeats`` 5, ``repetition_window`` 400,
    ``repetition_max_line_repeats`` 5), and why: 8 words in a row repeated
    verbatim is a quotation or a refrain in ordinary writing, not 6 times within 400
    words (a page); a loop of a sentence of p words is caught after about 6p words
    (p up to 66 fits the window), a few hundred tokens at most, while ``max_tokens``
    would let it run to the end. A line six times in a row catches loops of long lines
    (longer than the window allows for) and of numbered items ("1. I agree." …);
    shorter n-grams or lower counts stopped legitimate answers in tests (tables, code,
    lists: ``tests/test_autostop.py``). Raises ValueError for values that cannot work.
    """

    ngram: int = 8
    max_repeats: int = 5
    window: int = 400
    max_line_repeats: int = 5

    def __post_init__(self):
        if min(self.ngram, self.max_repeats, self.max_line_repeats) < 1:
            raise ValueError("the repetition guard's n-gram and counts must be at least 1")
        # The window must hold max_repeats + 1 occurrences of an n-gram, even overlapping.
        if self.window < self.ngram + self.max_repeats:
            raise ValueError(
                f"CHAT_TUNING.repetition_window ({self.window}) must be at least "
                f"CHAT_TUNING.repetition_ngram + CHAT_TUNING.repetition_max_repeats "
                f"({self.ngram + self.max_repeats}) words"
            )

    @classmethod
    def from_settings(cls) -> RepetitionRule:
        """The rule of the deployment's settings (raises ValueError if they cannot work)."""
        return cls(
            ngram=settings.CHAT_TUNING.repetition_ngram,
            max_repeats=settings.CHAT_TUNING.repetition_max_repeats,
            window=settings.CHAT_TUNING.repetition_window,
            max_line_repeats=settings.CHAT_TUNING.repetition_max_line_repeats,
        )


# A "word" longer than this (text without white space: a URL, base64, CJK) is cut into
# pieces of this many characters, so such text is still looked at and memory is bounded.
MAX_WORD_CHARS = 64
# Chinese characters and kana: written without spaces, each counts as a word.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
# Pieces of a chunk: a newline, other white space, one CJK character, other text.
_PIECES = re.compile(
    rf"(?P<newline>\n)|(?P<space>[^\S\n]+)|(?P<cjk>[{_CJK}])|(?P<text>[^\s{_CJK}]+)"
)
# A list marker ("1.", "2)", "10:") says nothing about the content of its item.
_LIST_MARKER = re.compile(r"\d+[.):]")
_LINE_MARKER = re.compile(r"(?:\d+[.):]|[-*+>])\s+")


def _is_word(text: str) -> bool:
    return any(c.isalnum() for c in text) and not _LIST_MARKER.fullmatch(text)


class RepetitionGuard:
    """Detects an answer that loops, fed its text incrementally.

    ``feed(text)`` takes each new piece of the answer (any split: a chunk, a character,
    the whole text give the same result) and returns True once the answer loops by
    :class:`RepetitionRule` (and from then on). Cost: O(len(text)) per call plus
    O(ngram) per completed word; memory O(window) words plus the current line.
    """

    def __init__(self, rule: RepetitionRule | None = None):
        self.rule = rule or RepetitionRule()
        self.fired = False
        self.words = 0  # words seen so far
        self._word: list[str] = []  # the word being received
        self._word_chars = 0
        self._recent: deque[str] = deque(maxlen=self.rule.ngram)
        # n-grams ending in the window, oldest first, and how often each occurs there.
        self._ngrams: deque[tuple[str, ...]] = deque()
        self._counts: Counter[tuple[str, ...]] = Counter()
        self._line: list[str] = []  # the line being received
        self._last_line: str | None = None
        self._line_run = 0

    def feed(self, text: str) -> bool:
        """Add ``text`` (the next part of the answer); True when the answer loops."""
        if self.fired:
            return True
        for match in _PIECES.finditer(text):
            piece, kind = match.group(), match.lastgroup
            if kind == "newline":
                self._end_word()
                self._end_line()
            elif kind == "space":
                self._end_word()
                self._line.append(piece)
            elif kind == "cjk":
                self._end_word()
                self._line.append(piece)
                self._add_word(piece)
            else:
                self._line.append(piece)
                self._word.append(piece)
                self._word_chars += len(piece)
                if self._word_chars >= MAX_WORD_CHARS:
                    self._cut_long_word()
            if self.fired:
                return True
        return False

    def _cut_long_word(self) -> None:
        word = "".join(self._word)
        while len(word) >= MAX_WORD_CHARS and not self.fired:
            piece, word = word[:MAX_WORD_CHARS], word[MAX_WORD_CHARS:]
            if _is_word(piece):
                self._add_word(piece)
        self._word, self._word_chars = ([word], len(word)) if word else ([], 0)

    def _end_word(self) -> None:
        if self._word:
            word = "".join(self._word)
            self._word.clear()
            self._word_chars = 0
            if _is_word(word):
                self._add_word(word)

    def _add_word(self, word: str) -> None:
        rule = self.rule
        self.words += 1
        self._recent.append(word)
        if len(self._recent) < rule.ngram:
            return
        key = tuple(self._recent)
        self._ngrams.append(key)
        self._counts[key] += 1
        # The window holds `window` words, so `window - ngram + 1` n-grams end in it.
        if len(self._ngrams) > rule.window - rule.ngram + 1:
            old = self._ngrams.popleft()
            self._counts[old] -= 1
            if not self._counts[old]:
                del self._counts[old]
        if self._counts[key] > rule.max_repeats:
            self.fired = True

    def _end_line(self) -> None:
        line = "".join(self._line).strip()
        self._line.clear()
        marker = _LINE_MARKER.match(line)
        if marker:
            line = line[marker.end():]
        if not any(c.isalnum() for c in line):
            return  # blank, or only markdown punctuation: neither counts nor breaks a run
        if line == self._last_line:
            self._line_run += 1
        else:
            self._last_line, self._line_run = line, 1
        if self._line_run > self.rule.max_line_repeats:
            self.fired = True


# --- the cost ceiling -------------------------------------------------------------------
class CostCeiling:
    """The running cost of one answer against its ceiling(s).

    ``prompt_tokens`` is counted once (as ``chat.accounting.count_prompt_tokens``);
    completion tokens are counted on each new piece of text (``feed``) with
    ``chat.accounting.count_tokens``, so the count grows with the stream without
    re-reading it. ``prices`` are USD per 1M (input, output) tokens
    (``accounting.unit_prices``); ``max_usd`` (USD, prompt plus answer) and
    ``max_tokens`` (answer tokens) are the ceilings, None for none. A piece counted
    alone may count a token more than the whole text would (a word cut in two), so the
    stop errs early by a token or so, never late by more than the last chunk.
    """

    def __init__(
        self,
        *,
        prompt_tokens: int,
        prices: tuple[Decimal, Decimal],
        max_usd: Decimal | None = None,
        max_tokens: int | None = None,
    ):
        self.prompt_tokens = prompt_tokens
        self.prices = prices
        self.max_usd = max_usd
        self.max_tokens = max_tokens
        self.completion_tokens = 0

    @property
    def cost_usd(self) -> Decimal:
        """What the answer has cost so far (USD, 8 decimals, as a UsageRecord counts)."""
        return accounting.cost_usd(self.prompt_tokens, self.completion_tokens, self.prices)

    @property
    def reached(self) -> bool:
        """True once a ceiling is reached (a cost equal to the ceiling reaches it)."""
        if self.max_tokens is not None and self.completion_tokens >= self.max_tokens:
            return True
        return self.max_usd is not None and self.cost_usd >= self.max_usd

    def feed(self, text: str) -> bool:
        """Count ``text`` (the next part of the answer); True once a ceiling is reached."""
        self.completion_tokens += accounting.count_tokens(text)
        return self.reached

    def answer_tokens_allowed(self) -> int | None:
        """The completion tokens at which the ceiling stops the answer (None: no bound):
        the token ceiling, or the first count whose cost reaches the USD ceiling."""
        bounds = []
        if self.max_tokens is not None:
            bounds.append(self.max_tokens)
        if self.max_usd is not None and self.prices[1] > 0:
            left = self.max_usd * accounting.MILLION - self.prompt_tokens * self.prices[0]
            bounds.append(max(math.ceil(left / self.prices[1]), 0))
        return min(bounds) if bounds else None


# --- the policy of one run ----------------------------------------------------------------
@dataclass
class AutoStop:
    """The automatic stops of one run: a :class:`RepetitionGuard` and/or a
    :class:`CostCeiling` (None: that rule is off). ``check(text)`` is called by the
    generation with each new piece of the answer; it returns the finish_reason to stop
    with (``repetition``, ``cost_limit``) once a rule fires, else None. ``AutoStop()``
    stops nothing."""

    guard: RepetitionGuard | None = None
    ceiling: CostCeiling | None = None
    reason: str | None = None
    # Where the ceilings came from, for the log and the docs: {"max_usd": ..., ...}.
    limits: dict = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.guard is not None or self.ceiling is not None

    def check(self, text: str, reasoning: str = "") -> str | None:
        """Feed ``text`` to the rules, and ``reasoning`` (billed as completion tokens)
        to the cost ceiling only; the reason to stop, or None to go on."""
        if self.reason is None and reasoning and self.ceiling and self.ceiling.feed(reasoning):
            self.reason = COST_LIMIT
        if self.reason is None and text:
            if self.guard is not None and self.guard.feed(text):
                self.reason = REPETITION
            elif self.ceiling is not None and self.ceiling.feed(text):
                self.reason = COST_LIMIT
        return self.reason

    def reserve(self, max_tokens: int) -> int:
        """Completion tokens the budget check should count for this run: ``max_tokens``,
        or fewer when a ceiling stops the answer earlier (chat.budgets counts the
        request as its prompt plus this, priced at today's prices)."""
        allowed = self.ceiling.answer_tokens_allowed() if self.ceiling else None
        return max_tokens if allowed is None else min(max_tokens, allowed)

    @classmethod
    def for_run(cls, user, conversation, *, model: str, prompt_tokens: int,
                budget=_READ_BUDGET) -> AutoStop:
        """The automatic stops of a run of ``conversation`` (a Conversation row) by
        ``user`` with ``model``, whose prompt counts ``prompt_tokens`` tokens: the
        deployment's settings, the user's budget and the conversation's fields, the
        tightest ceiling winning. Reads the user's budget (unless ``budget``, their
        UserBudget or None, is given: the start has read it already) and the model's
        prices (database, synchronous).

        Raises chat.generation.QuotaExceeded (``limit`` ``max_answer_usd``) when the
        prompt alone already costs the USD ceiling: every answer would be stopped at
        its first token, so nothing is sent.
        """
        guard_on = conversation.repetition_guard
        if guard_on is None:
            guard_on = settings.CHAT_REPETITION_GUARD
        guard = RepetitionGuard(RepetitionRule.from_settings()) if guard_on else None
        usd_limits = {
            "deployment": settings.CHAT_MAX_ANSWER_USD,
            "budget": (UserBudget.objects.filter(user=user).values_list(
                "max_answer_usd", flat=True).first() if budget is _READ_BUDGET
                else getattr(budget, "max_answer_usd", None)),
            "conversation": conversation.max_answer_usd,
        }
        token_limits = {
            "deployment": settings.CHAT_MAX_ANSWER_TOKENS,
            "conversation": conversation.max_answer_tokens,
        }
        max_usd = min((v for v in usd_limits.values() if v is not None), default=None)
        max_tokens = min((v for v in token_limits.values() if v is not None), default=None)
        limits = {"max_usd": max_usd, "max_tokens": max_tokens}
        if max_usd is None and max_tokens is None:
            return cls(guard=guard, limits=limits)
        ceiling = CostCeiling(
            prompt_tokens=prompt_tokens, prices=accounting.unit_prices(model),
            max_usd=max_usd, max_tokens=max_tokens,
        )
        if max_usd is not None and ceiling.cost_usd >= max_usd:
            raise QuotaExceeded(
                f"The prompt of this conversation alone costs {format_usd(ceiling.cost_usd)}, "
                f"which reaches the cost limit of an answer ({format_usd(max_usd)}). "
                "Start a new conversation, or raise the limit.",
                limit="max_answer_usd",
                requested={"tokens": prompt_tokens, "usd": f"{ceiling.cost_usd:.8f}"},
            )
        return cls(guard=guard, ceiling=ceiling, limits=limits)


# --- conversation settings ------------------------------------------------------------------
def parse_usd(value) -> Decimal | None:
    """A per-answer USD ceiling from JSON: None, or a decimal string of at most 6 whole
    digits and 8 decimals (``USD_PATTERN``), or a number (int, float, Decimal) that
    reads as one. Raises ValueError with a sentence for the user otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float, Decimal)):
        raise ValueError("max_answer_usd must be a decimal string such as \"0.05\", or null.")
    if isinstance(value, float | Decimal) and not math.isfinite(value):
        raise ValueError("max_answer_usd must be a finite amount.")
    text = value if isinstance(value, str) else format(Decimal(str(value)), "f")
    if not re.fullmatch(USD_PATTERN, text):
        raise ValueError(
            "max_answer_usd must be an amount in USD from 0 to 999999.99999999 "
            "(at most 8 decimals), or null."
        )
    try:
        return Decimal(text)
    except InvalidOperation:  # pragma: no cover - the pattern only lets decimals through
        raise ValueError("max_answer_usd is not a decimal number.") from None


def parse_tokens(value) -> int | None:
    """A per-answer token ceiling from JSON: None or an integer from 1 to
    MAX_ANSWER_TOKENS_LIMIT. Raises ValueError otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not (
        1 <= value <= MAX_ANSWER_TOKENS_LIMIT
    ):
        raise ValueError(
            f"max_answer_tokens must be an integer from 1 to {MAX_ANSWER_TOKENS_LIMIT}, or null."
        )
    return value


def conversation_fields(values: dict | None) -> dict:
    """The Conversation fields of ``CONVERSATION_FIELDS`` found in ``values`` (e.g. the
    first ``message`` frame), checked: ``repetition_guard`` true/false/null,
    ``max_answer_usd`` as :func:`parse_usd`, ``max_answer_tokens`` as
    :func:`parse_tokens`. Absent keys are left out. Raises chat.generation.
    InvalidRequest (error frame ``invalid``) naming the field otherwise."""
    values = values or {}
    fields = {}
    try:
        if "repetition_guard" in values:
            guard = values["repetition_guard"]
            if guard is not None and not isinstance(guard, bool):
                raise ValueError("repetition_guard must be true, false or null.")
            fields["repetition_guard"] = guard
        if "max_answer_usd" in values:
            fields["max_answer_usd"] = parse_usd(values["max_answer_usd"])
        if "max_answer_tokens" in values:
            fields["max_answer_tokens"] = parse_tokens(values["max_answer_tokens"])
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    return fields
