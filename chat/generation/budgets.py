"""Per-user budgets checked before a generation starts (see ``UserBudget``).

Two kinds of limit, both set per user in the admin:

* **Quotas**: tokens and/or USD per UTC day and per UTC month. What the user used in
  the period (the sum of their ``UsageRecord`` rows since the period started), plus what
  their generations still running may use, plus what the new request may use (its
  prompt tokens plus the requested ``max_tokens``, priced at today's unit prices), must
  fit the limit. The request is counted at its maximum because the answer's length is
  not known before it is generated; the record written at the end holds what it really
  used. An empty limit is unlimited.
* **Concurrency**: at most ``max_concurrent`` generations of the user stream at once,
  across every tab and server process (1 for users without a ``UserBudget`` row). It
  counts the user's assistant messages with status ``streaming`` whose lease is fresh
  (``MessageQuerySet.stale`` marks the others dead), which every process sees alike.

:func:`check` runs inside the transaction of ``chat.generation.store.prepare_*`` that
creates the assistant row, so a refused request saves nothing and sends nothing
upstream.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from decimal import Decimal

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models import Q, Sum
from django.utils import timezone

from .. import accounting
from ..models import Message, UsageRecord, UserBudget
from ..money import format_usd
from .errors import ConcurrencyLimit, QuotaExceeded
from .prompt import prompt_for_estimate

UTC = dt.UTC
# Quota fields of UserBudget, in the order they are reported.
QUOTA_FIELDS = ("tokens_per_day", "usd_per_day", "tokens_per_month", "usd_per_month")
DEFAULT_MAX_CONCURRENT = 1
# ``check(budget=READ)``: lock the user and read their budget here.
READ = object()


@dataclass(frozen=True)
class Periods:
    """Start of the current UTC day and month, and when each resets (all aware UTC)."""

    day_start: dt.datetime
    day_end: dt.datetime
    month_start: dt.datetime
    month_end: dt.datetime

    @classmethod
    def at(cls, now: dt.datetime) -> Periods:
        now = now.astimezone(UTC)
        day_start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        month_start = day_start.replace(day=1)
        if month_start.month == 12:
            month_end = month_start.replace(year=month_start.year + 1, month=1)
        else:
            month_end = month_start.replace(month=month_start.month + 1)
        return cls(day_start, day_start + dt.timedelta(days=1), month_start, month_end)


@dataclass(frozen=True)
class Usage:
    """What a user used (or may use) in the current day and month: tokens and USD."""

    tokens_day: int = 0
    usd_day: Decimal = Decimal(0)
    tokens_month: int = 0
    usd_month: Decimal = Decimal(0)

    def value(self, field: str):
        """The used amount that the ``UserBudget`` field ``field`` limits."""
        return {
            "tokens_per_day": self.tokens_day,
            "usd_per_day": self.usd_day,
            "tokens_per_month": self.tokens_month,
            "usd_per_month": self.usd_month,
        }[field]


def used(user, periods: Periods) -> Usage:
    """The user's recorded usage in the current UTC day and month (one query)."""
    today = Q(created_at__gte=periods.day_start)
    totals = UsageRecord.objects.filter(user=user, created_at__gte=periods.month_start).aggregate(
        tokens_month=Sum("total_tokens"),
        usd_month=Sum("cost_usd"),
        tokens_day=Sum("total_tokens", filter=today),
        usd_day=Sum("cost_usd", filter=today),
    )
    return Usage(
        tokens_day=totals["tokens_day"] or 0,
        usd_day=totals["usd_day"] or Decimal(0),
        tokens_month=totals["tokens_month"] or 0,
        usd_month=totals["usd_month"] or Decimal(0),
    )


def running(user, now: dt.datetime | None = None):
    """The user's assistant messages that are streaming now, in any conversation and
    process (stale ones, whose process stopped heartbeating, are left out)."""
    now = now or timezone.now()
    cutoff = now - dt.timedelta(seconds=settings.CHAT_LEASE_S)
    return Message.objects.streaming().filter(
        conversation__owner=user, role=Message.Role.ASSISTANT, heartbeat_at__gte=cutoff
    )


def reserved(messages, max_tokens: int) -> tuple[int, Decimal]:
    """Tokens and USD that running generations may still use: their prompt (estimated
    from the history before them, as ``finish_stale`` does) plus ``max_tokens`` each.
    They have no UsageRecord until they end, so without this a user allowed several
    concurrent generations could start them all against the same remainder."""
    tokens, usd = 0, Decimal(0)
    for message in messages.select_related("conversation"):
        prompt = accounting.count_prompt_tokens(
            prompt_for_estimate(message.conversation, before=message.created_at)
        )
        tokens += prompt + max_tokens
        usd += accounting.cost_usd(prompt, max_tokens, accounting.unit_prices(message.model))
    return tokens, usd


def lock_user(user) -> UserBudget | None:
    """Lock ``user``'s row for this transaction and return their UserBudget (None: they
    have none), in one query (the budget joined to the locked row). The lock is
    ``SELECT ... FOR NO KEY UPDATE OF`` the user row on PostgreSQL (see :func:`check`);
    SQLite's IMMEDIATE transactions already serialise writers."""
    locked = (get_user_model().objects.select_for_update(no_key=True, of=("self",))
              .select_related("budget").get(pk=user.pk))
    try:
        return locked.budget
    except UserBudget.DoesNotExist:
        return None


def check(
    user,
    *,
    prompt_tokens: int,
    max_tokens: int,
    model: str | None = None,
    now: dt.datetime | None = None,
    budget=READ,
) -> None:
    """Refuse a generation that the user's budget does not allow.

    ``prompt_tokens`` and ``max_tokens`` are tokens; ``model`` prices them (USD limits;
    default ``settings.CHAT_MODEL``); ``now`` is for tests. Must run inside the
    transaction that creates the assistant row: it first locks the user's row
    (``SELECT ... FOR NO KEY UPDATE`` on PostgreSQL; SQLite's IMMEDIATE transactions already
    serialise writers), so two starts of the same user in different conversations or
    processes are checked one after the other and the second sees the first's
    ``streaming`` row. Raises RuntimeError when called outside a transaction.

    Raises:
        ConcurrencyLimit: ``max_concurrent`` generations are already streaming. The
            frame carries ``limit`` and ``running``.
        QuotaExceeded: the request does not fit a quota. The frame carries ``limit``
            (the first quota exceeded), ``remaining`` (what is left of each quota set:
            tokens as int, USD as a decimal string), ``requested`` (``tokens``, ``usd``)
            and ``resets_at`` (ISO 8601 UTC: when the exceeded quotas all reset).

    ``budget``: the user's UserBudget or None, when the caller already took the lock
    and read it with :func:`lock_user` in this transaction (a start saves a query).
    """
    if not transaction.get_connection().in_atomic_block:
        # Outside the transaction the lock would be released at once and the count race.
        raise RuntimeError("budgets.check must run inside the transaction of store.prepare_*")
    now = now or timezone.now()
    # The lock is taken for every user, budget or not: max_concurrent applies to all.
    # FOR NO KEY UPDATE: it serialises checks of the same user but, unlike FOR UPDATE,
    # does not block inserts that merely reference the user (a UsageRecord written
    # by a run ending meanwhile takes FOR KEY SHARE on the user row).
    if budget is READ:
        budget = lock_user(user)
    limit = budget.max_concurrent if budget is not None else DEFAULT_MAX_CONCURRENT
    in_flight = running(user, now)
    count = in_flight.count()
    if count >= limit:
        raise ConcurrencyLimit(
            f"You already have {count} answer{'s' if count != 1 else ''} being generated "
            f"(your limit is {limit}). Wait for it to finish or stop it.",
            limit=limit,
            running=count,
        )
    if budget is None or all(getattr(budget, f) is None for f in QUOTA_FIELDS):
        return
    model = model or settings.CHAT_MODEL
    requested_tokens = prompt_tokens + max_tokens
    requested_usd = accounting.cost_usd(prompt_tokens, max_tokens, accounting.unit_prices(model))
    periods = Periods.at(now)
    past = used(user, periods)
    held_tokens, held_usd = reserved(in_flight, max_tokens) if count else (0, Decimal(0))
    usage = Usage(
        tokens_day=past.tokens_day + held_tokens,
        usd_day=past.usd_day + held_usd,
        tokens_month=past.tokens_month + held_tokens,
        usd_month=past.usd_month + held_usd,
    )
    remaining, exceeded = {}, []
    for field in QUOTA_FIELDS:
        cap = getattr(budget, field)
        if cap is None:
            continue
        left = max(cap - usage.value(field), 0)
        need = requested_tokens if field.startswith("tokens") else requested_usd
        remaining[field] = left if field.startswith("tokens") else f"{left:.4f}"
        if need > left:
            exceeded.append(field)
    if not exceeded:
        return
    resets_at = periods.month_end if any(f.endswith("month") for f in exceeded) else periods.day_end
    first = exceeded[0]
    unit = "tokens" if first.startswith("tokens") else "USD"
    period = "daily" if first.endswith("day") else "monthly"
    left = remaining[first] if unit == "tokens" else format_usd(Decimal(remaining[first]))
    raise QuotaExceeded(
        f"This request may use up to {requested_tokens} tokens ({format_usd(requested_usd)}), "
        f"more than what is left of your {period} {unit} limit "
        f"({left}). It resets at {resets_at:%Y-%m-%d %H:%M} UTC.",
        limit=first,
        remaining=remaining,
        requested={"tokens": requested_tokens, "usd": f"{requested_usd:.8f}"},
        resets_at=resets_at.isoformat().replace("+00:00", "Z"),
    )
