"""Per-user budgets checked before a generation starts (see ``UserBudget``).

Two kinds of limit, both set per user in the admin:

* **Quotas**: tokens and/or USD per UTC day and per UTC month. What the user used in
  the period (the sum of their ``UsageRecord`` rows since the period started), plus what
  their generations still running may use, plus what the new request may use, must fit
  the limit. A run is counted at its maximum, its *reservation* (:class:`Reservation`:
  its prompt tokens plus its own completion-token ceiling, priced at its model's unit
  prices), because the answer's length is not known before it is generated. The
  reservation is stored on the run's assistant row (``Message.reserved_tokens`` /
  ``reserved_usd``) when it starts, and the check sums those of the user's running rows,
  so a run with a large ceiling keeps holding it while a later run with a small one
  asks. The record written at the end holds what it really used, in the same
  transaction that ends the row's ``streaming`` status. An empty limit is unlimited.
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
from django.db.models import Count, Q, Sum
from django.utils import timezone

from .. import accounting
from ..models import Message, UsageRecord, UserBudget
from ..money import format_usd
from .errors import ConcurrencyLimit, QuotaExceeded

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
    cutoff = now - dt.timedelta(seconds=settings.CHAT_TUNING.lease_s)
    return Message.objects.streaming().filter(
        conversation__owner=user, role=Message.Role.ASSISTANT, heartbeat_at__gte=cutoff
    )


@dataclass(frozen=True)
class Reservation:
    """What one run may use of its user's quotas until its UsageRecord is written.

    ``tokens``: its prompt tokens (estimated) plus its completion-token ceiling (the
    request's ``max_tokens``, or the lower bound of an automatic stop); ``usd``: those
    tokens at its model's unit prices when it started, None when they were not priced
    (its user had no quota; pricing costs a start a query). Stored on the run's
    assistant row (``Message.reserved_tokens``, ``Message.reserved_usd``)."""

    tokens: int
    usd: Decimal | None


@dataclass(frozen=True)
class Held:
    """The user's running generations (see :func:`running`): how many, and the sum of
    their reservations: ``tokens``, ``usd`` of the priced ones, and ``unpriced_tokens``
    (the tokens of those stored without a USD amount)."""

    count: int = 0
    tokens: int = 0
    usd: Decimal = Decimal(0)
    unpriced_tokens: int = 0

    def usd_at(self, prices: tuple[Decimal, Decimal]) -> Decimal:
        """USD they hold, the unpriced tokens counted at the dearer of ``prices`` (USD
        per 1M input, output tokens): an upper bound of what they may cost."""
        dearer = max(prices[0], prices[1])
        extra = Decimal(self.unpriced_tokens) * dearer / accounting.MILLION
        return self.usd + extra.quantize(Decimal("0.00000001"))


def held(user, now: dt.datetime | None = None) -> Held:
    """Count and sum the reservations of the user's running generations, in one
    aggregate query over the stored ``reserved_*`` fields (nothing is re-estimated)."""
    totals = running(user, now).aggregate(
        count=Count("id"),
        tokens=Sum("reserved_tokens"),
        usd=Sum("reserved_usd"),
        unpriced=Sum("reserved_tokens", filter=Q(reserved_usd__isnull=True)),
    )
    return Held(count=totals["count"] or 0, tokens=totals["tokens"] or 0,
                usd=totals["usd"] or Decimal(0), unpriced_tokens=totals["unpriced"] or 0)


def held_by_user(user_ids, now: dt.datetime | None = None) -> dict[int, Held]:
    """:func:`held` of several users in one query (grouped by user): user id -> Held;
    a user with no running generation is left out (``Held()``)."""
    now = now or timezone.now()
    cutoff = now - dt.timedelta(seconds=settings.CHAT_TUNING.lease_s)
    rows = (Message.objects.streaming()
            .filter(conversation__owner__in=list(user_ids), role=Message.Role.ASSISTANT,
                    heartbeat_at__gte=cutoff)
            .values("conversation__owner")
            .annotate(count=Count("id"), tokens=Sum("reserved_tokens"),
                      usd=Sum("reserved_usd"),
                      unpriced=Sum("reserved_tokens", filter=Q(reserved_usd__isnull=True)))
            .order_by())
    return {row["conversation__owner"]: Held(
        count=row["count"] or 0, tokens=row["tokens"] or 0, usd=row["usd"] or Decimal(0),
        unpriced_tokens=row["unpriced"] or 0) for row in rows}


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


def lock_users(user_ids) -> dict[int, UserBudget | None]:
    """:func:`lock_user` of several users in one query, in the order of their ids (two
    transactions locking some of the same users then cannot deadlock): user id ->
    their UserBudget or None."""
    locked = (get_user_model().objects.select_for_update(no_key=True, of=("self",))
              .select_related("budget").filter(pk__in=list(user_ids)).order_by("pk"))
    budgets = {}
    for user in locked:
        try:
            budgets[user.pk] = user.budget
        except UserBudget.DoesNotExist:
            budgets[user.pk] = None
    return budgets


def check(
    user,
    *,
    prompt_tokens: int,
    max_tokens: int,
    model: str | None = None,
    now: dt.datetime | None = None,
    budget=READ,
    prices: tuple[Decimal, Decimal] | None = None,
    in_flight: Held | None = None,
) -> Reservation:
    """Refuse a generation that the user's budget does not allow; return the
    :class:`Reservation` of an allowed one, to store on its assistant row.

    ``prompt_tokens`` and ``max_tokens`` (the run's own completion ceiling) are tokens;
    ``model`` prices them (USD limits; default ``settings.CHAT_MODEL``) unless
    ``prices`` (USD per 1M input, output tokens of that model) is given; ``now`` is for
    tests. Must run inside the transaction that creates the assistant row: it first
    locks the user's row (``SELECT ... FOR NO KEY UPDATE`` on PostgreSQL; SQLite's
    IMMEDIATE transactions already serialise writers), so two starts of the same user in
    different conversations or processes are checked one after the other and the second
    sees the first's ``streaming`` row with its reservation. Raises RuntimeError when
    called outside a transaction.

    The reservation's ``usd`` is None when nothing needed pricing (no quota set and no
    ``prices`` given): a start of a user without quotas costs no price lookup.

    Raises:
        ConcurrencyLimit: ``max_concurrent`` generations are already streaming. The
            frame carries ``limit`` and ``running``.
        QuotaExceeded: the request does not fit a quota. The frame carries ``limit``
            (the first quota exceeded), ``remaining`` (what is left of each quota set:
            tokens as int, USD as a decimal string), ``requested`` (``tokens``, ``usd``)
            and ``resets_at`` (ISO 8601 UTC: when the exceeded quotas all reset).

    ``budget``: the user's UserBudget or None, when the caller already took the lock
    and read it with :func:`lock_user` in this transaction (a start saves a query);
    ``in_flight``: the user's :func:`held`, when the caller read it under that lock (a
    batch of starts: ``store.prepare_batch``).
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
    # One query: the count the concurrency limit needs and the reservations the quotas do.
    in_flight = held(user, now) if in_flight is None else in_flight
    count = in_flight.count
    if count >= limit:
        raise ConcurrencyLimit(
            f"You already have {count} answer{'s' if count != 1 else ''} being generated "
            f"(your limit is {limit}). Wait for it to finish or stop it.",
            limit=limit,
            running=count,
        )
    requested_tokens = prompt_tokens + max_tokens
    if budget is None or all(getattr(budget, f) is None for f in QUOTA_FIELDS):
        usd = None if prices is None else accounting.cost_usd(prompt_tokens, max_tokens, prices)
        return Reservation(requested_tokens, usd)
    prices = prices or accounting.unit_prices(model or settings.CHAT_MODEL)
    requested_usd = accounting.cost_usd(prompt_tokens, max_tokens, prices)
    periods = Periods.at(now)
    past = used(user, periods)
    held_usd = in_flight.usd_at(prices)
    usage = Usage(
        tokens_day=past.tokens_day + in_flight.tokens,
        usd_day=past.usd_day + held_usd,
        tokens_month=past.tokens_month + in_flight.tokens,
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
        return Reservation(requested_tokens, requested_usd)
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
