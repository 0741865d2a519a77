"""Figures about usage records for the admin: totals, daily series, top lists, CSV.

Every function takes a ``UsageRecord`` queryset (already filtered, e.g. the admin
changelist's) and runs a fixed number of queries whatever its size. Tokens are counts,
costs are USD (``Decimal``), days are UTC dates.
"""

from __future__ import annotations

import csv
import datetime as dt
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal

from asgiref.sync import sync_to_async
from django.db.models import Count, F, IntegerField, Q, Sum, Value
from django.db.models.functions import Coalesce, Greatest, TruncDate
from django.utils import timezone

from .generation.autostop import STOP_REASONS
from .models import Message
from .money import plain_decimal

UTC = dt.UTC
STOPPED = Message.Status.CANCELLED


def totals(queryset) -> dict:
    """``{"runs", "prompt_tokens", "completion_tokens", "total_tokens", "cost_usd",
    "stopped", "stopped_share"}`` of the records (one query). ``stopped`` counts runs
    the user stopped (status ``cancelled``); ``stopped_share`` is their fraction of
    ``runs`` (0.0 to 1.0; 0.0 when there are none)."""
    figures = queryset.order_by().aggregate(
        runs=Count("pk"),
        prompt_tokens=Sum("prompt_tokens"),
        completion_tokens=Sum("completion_tokens"),
        total_tokens=Sum("total_tokens"),
        cost_usd=Sum("cost_usd"),
        stopped=Count("pk", filter=Q(status=STOPPED)),
    )
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        figures[key] = figures[key] or 0
    figures["cost_usd"] = figures["cost_usd"] or Decimal(0)
    figures["stopped_share"] = figures["stopped"] / figures["runs"] if figures["runs"] else 0.0
    return figures


def last_days(days: int, now: dt.datetime | None = None) -> list[dt.date]:
    """The ``days`` UTC dates ending today, oldest first."""
    today = (now or timezone.now()).astimezone(UTC).date()
    return [today - dt.timedelta(days=n) for n in range(days - 1, -1, -1)]


def daily_by_model(queryset, days: list[dt.date]) -> dict[str, dict[dt.date, dict]]:
    """``{model: {date: {"tokens": int, "cost_usd": Decimal}}}`` for records created on
    ``days`` (UTC), models ordered by cost over the period, highest first (one query)."""
    start = dt.datetime.combine(days[0], dt.time.min, tzinfo=UTC)
    end = dt.datetime.combine(days[-1], dt.time.min, tzinfo=UTC) + dt.timedelta(days=1)
    rows = (
        queryset.filter(created_at__gte=start, created_at__lt=end)
        .annotate(day=TruncDate("created_at", tzinfo=UTC))
        .order_by()
        .values("model", "day")
        .annotate(tokens=Sum("total_tokens"), cost_usd=Sum("cost_usd"))
    )
    series: dict[str, dict[dt.date, dict]] = {}
    for row in rows:
        series.setdefault(row["model"], {})[row["day"]] = {
            "tokens": row["tokens"] or 0,
            "cost_usd": row["cost_usd"] or Decimal(0),
        }

    def period_cost(model):
        return sum((v["cost_usd"] for v in series[model].values()), Decimal(0))

    return {model: series[model] for model in sorted(series, key=period_cost, reverse=True)}


def top(queryset, *by: str, limit: int = 10) -> list[dict]:
    """The ``limit`` groups with the highest cost, grouped ``by`` field paths such as
    ``"model"`` or ``"user_id", "user__username"``: ``[{*by, "runs", "total_tokens",
    "cost_usd", "stopped"}]`` (one query)."""
    return list(
        queryset.order_by()
        .values(*by)
        .annotate(
            runs=Count("pk"),
            total_tokens=Sum("total_tokens"),
            cost_usd=Sum("cost_usd"),
            stopped=Count("pk", filter=Q(status=STOPPED)),
        )
        .order_by("-cost_usd", "-total_tokens")[:limit]
    )


# What the report calls each automatic stop (chat.generation.autostop), by finish_reason.
STOP_RULES = {
    "repetition": "Repetition guard (the answer was repeating itself)",
    "cost_limit": "Cost ceiling (the answer reached its cost limit)",
}


def automatic_stops(queryset) -> list[dict]:
    """Runs stopped by each automatic stop (chat.generation.autostop), one row per rule in
    ``STOP_REASONS`` order, rules with no run included (one query):
    ``[{"finish_reason", "rule", "runs", "completion_tokens", "tokens_saved",
    "cost_usd"}]``.

    ``tokens_saved`` estimates what each stop saved as the run's ``max_tokens`` minus
    the completion tokens it generated (at least 0): what the answer could still have
    cost had it run to its limit. Records without ``max_tokens`` (older than the field)
    count 0 saved."""
    saved = Greatest(
        Coalesce(F("max_tokens") - F("completion_tokens"), Value(0)), Value(0),
        output_field=IntegerField(),
    )
    rows = {
        row["finish_reason"]: row
        for row in queryset.filter(finish_reason__in=STOP_REASONS)
        .order_by()
        .values("finish_reason")
        # Saved first: an F("completion_tokens") after an annotation of that name would
        # read the annotation.
        .annotate(
            tokens_saved=Sum(saved),
            generated=Sum("completion_tokens"),
            runs=Count("pk"),
            cost=Sum("cost_usd"),
        )
    }
    report = []
    for reason in STOP_REASONS:
        row = rows.get(reason, {})
        report.append({
            "finish_reason": reason,
            "rule": STOP_RULES.get(reason, reason),
            "runs": row.get("runs") or 0,
            "completion_tokens": row.get("generated") or 0,
            "tokens_saved": row.get("tokens_saved") or 0,
            "cost_usd": row.get("cost") or Decimal(0),
        })
    return report


# --- CSV --------------------------------------------------------------------------------
CSV_HEADER = [
    "id", "created_at", "user_id", "username", "conversation_id", "conversation_title",
    "message_id", "model", "status", "prompt_tokens", "completion_tokens", "total_tokens",
    "estimated", "input_usd_per_mtok", "output_usd_per_mtok", "cost_usd", "ttft_ms",
    "duration_ms",
    # Last, so scripts reading columns by position still work.
    "finish_reason", "source", "reasoning_tokens", "cached_tokens", "reasoning_hidden",
    "cached_input_usd_per_mtok",
]
# Records fetched per query while exporting: bounds memory whatever the export's size.
CSV_CHUNK_ROWS = 2000
# A cell starting with one of these is a formula in spreadsheet programs (OWASP "CSV
# injection"); such cells from user-controlled text get a leading apostrophe.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


class _Echo:
    """File-like object whose ``write`` returns the line (Django docs, "Streaming large
    CSV files")."""

    def write(self, value):
        return value


def _text(value: str) -> str:
    return "'" + value if value.startswith(_FORMULA_START) else value


def _csv_row(record) -> list:
    return [
        record.pk,
        record.created_at.astimezone(UTC).isoformat(),
        record.user_id or "",
        _text(record.user.get_username()) if record.user else "",
        record.conversation_id or "",
        _text(record.conversation.title) if record.conversation else "",
        record.message_id or "",
        _text(record.model),
        record.status,
        record.prompt_tokens,
        record.completion_tokens,
        record.total_tokens,
        "true" if record.estimated else "false",
        plain_decimal(record.input_price_per_mtok),
        plain_decimal(record.output_price_per_mtok),
        plain_decimal(record.cost_usd),
        "" if record.ttft_ms is None else record.ttft_ms,
        record.duration_ms,
        _text(record.finish_reason),
        record.source,
        record.reasoning_tokens,
        record.cached_tokens,
        "true" if record.reasoning_hidden else "false",
        # Empty: the record predates the field (its cached tokens cost the input price).
        "" if record.cached_input_price_per_mtok is None
        else plain_decimal(record.cached_input_price_per_mtok),
    ]


def csv_chunk(
    queryset, before_pk: int | None, size: int = CSV_CHUNK_ROWS
) -> tuple[str, int | None]:
    """CSV lines of the next ``size`` records with a primary key below ``before_pk``
    (newest first), and the key to continue from (None when done).

    Keyset pagination rather than ``iterator()``: each chunk is a complete query, so an
    asynchronous response can fetch chunks between awaits without keeping a database
    cursor open across them."""
    page = queryset.select_related("user", "conversation").order_by("-pk")
    if before_pk is not None:
        page = page.filter(pk__lt=before_pk)
    records = list(page[:size])
    writer = csv.writer(_Echo())
    text = "".join(writer.writerow(_csv_row(record)) for record in records)
    return text, (records[-1].pk if len(records) == size else None)


def _header() -> str:
    return csv.writer(_Echo()).writerow(CSV_HEADER)


def csv_lines(queryset) -> Iterator[str]:
    """The export as CSV text chunks (header first), for a synchronous (WSGI) response."""
    yield _header()
    before = None
    while True:
        text, before = csv_chunk(queryset, before)
        if text:
            yield text
        if before is None:
            return


async def acsv_lines(queryset) -> AsyncIterator[str]:
    """The same chunks for an ASGI response: Django reads a synchronous iterator
    completely into memory before sending it under ASGI, an asynchronous one is sent as
    it is produced."""
    yield _header()
    before = None
    while True:
        text, before = await sync_to_async(csv_chunk)(queryset, before)
        if text:
            yield text
        if before is None:
            return
