"""The usage record of a run: which counts it gets (their ``source``), what they cost,
and the later correction from the provider's own record (OpenRouter's generation
lookup). Synchronous, called inside store.finalize's transaction (call apply_lookup
through ``database_sync_to_async``).

The order of sources, most exact first: the provider's final usage, its running count,
the server's own tokenizer, then tiktoken.
"""

from __future__ import annotations

import functools
from decimal import Decimal
from typing import TYPE_CHECKING

from django.db import transaction

from .. import accounting, metrics
from ..models import Message, UsageRecord
from .outcome import Outcome

if TYPE_CHECKING:
    from . import store


def _counts(counts: dict, name: str) -> int:
    return int(counts.get(name) or 0)


def usage_counts(run: store.RunRef, outcome: Outcome, content: str, reasoning: str) -> dict:
    """``{"source", "prompt_tokens", "completion_tokens", "reasoning_tokens",
    "cached_tokens", "reasoning_hidden"}`` of a run: the best counts it has (see
    store.finalize); a reported usage is kept whatever the end (it is what was
    billed). An estimate counts the reasoning text seen with the answer's."""
    Source = UsageRecord.Source
    found = [(source, counts) for source, counts in (
        (Source.REPORTED, outcome.usage), (Source.RUNNING, outcome.running_usage),
        (Source.TOKENIZED, outcome.tokenized)) if counts is not None]
    if found:
        source, counts = found[0]
    else:
        source = Source.ESTIMATED
        counts = {"prompt_tokens": accounting.count_prompt_tokens(run.prompt or []),
                  "completion_tokens": accounting.count_tokens(content)
                  + accounting.count_tokens(reasoning)}
    return {
        "source": source,
        "prompt_tokens": _counts(counts, "prompt_tokens"),
        "completion_tokens": _counts(counts, "completion_tokens"),
        "reasoning_tokens": _counts(counts, "reasoning_tokens"),
        "cached_tokens": _counts(counts, "cached_tokens"),
        # Hidden reasoning is billed but cannot be counted from the stream.
        "reasoning_hidden": outcome.reasoning_hidden and source != Source.REPORTED,
    }


def settle(run: store.RunRef, outcome: Outcome, message: Message) -> UsageRecord:
    """The run's UsageRecord (counts from :func:`usage_counts`), priced at today's unit
    prices, which the record keeps; cached prompt tokens at the cached input price."""
    counts = usage_counts(run, outcome, message.content, message.reasoning)
    prices = accounting.price_list(run.model)
    prompt_tokens, completion_tokens = counts["prompt_tokens"], counts["completion_tokens"]
    record = UsageRecord.objects.create(
        user_id=run.user_id, conversation_id=run.conversation_id, message=message,
        model=run.model, status=outcome.status, prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens,
        estimated=counts["source"] != UsageRecord.Source.REPORTED, source=counts["source"],
        reasoning_tokens=counts["reasoning_tokens"], cached_tokens=counts["cached_tokens"],
        reasoning_hidden=counts["reasoning_hidden"],
        input_price_per_mtok=prices[0], output_price_per_mtok=prices[1],
        cached_input_price_per_mtok=prices[2],
        cost_usd=accounting.cost_usd(prompt_tokens, completion_tokens, prices,
                                     cached_tokens=counts["cached_tokens"]),
        ttft_ms=outcome.ttft_ms, duration_ms=outcome.duration_ms,
        # autostop hook: how it ended and what it could have used (the admin report).
        finish_reason=outcome.finish_reason, max_tokens=run.max_tokens,
    )
    # Counted once the record is committed: the metrics agree with the database.
    transaction.on_commit(functools.partial(metrics.run_recorded, record))
    return record


def apply_lookup(message_id: str, usage: dict) -> UsageRecord | None:
    """Replace a run's counts by the provider's own record of the generation
    (OpenRouter's ``GET /api/v1/generation``: ``usage`` has ``prompt_tokens``,
    ``completion_tokens``, optional ``reasoning_tokens``/``cached_tokens`` and
    ``cost_usd``, the provider's price in USD, which replaces ours when given). The
    record becomes ``reported``. Returns it, or None when the run has no record."""
    with transaction.atomic():
        record = UsageRecord.objects.select_for_update().filter(message_id=message_id).first()
        if record is None:
            return None
        counted = metrics.usage_counts(record)
        record.prompt_tokens = _counts(usage, "prompt_tokens")
        record.completion_tokens = _counts(usage, "completion_tokens")
        record.total_tokens = record.prompt_tokens + record.completion_tokens
        record.reasoning_tokens = _counts(usage, "reasoning_tokens")
        record.cached_tokens = _counts(usage, "cached_tokens")
        record.source = UsageRecord.Source.REPORTED
        record.estimated = record.reasoning_hidden = False
        cost = usage.get("cost_usd")
        prices = (record.input_price_per_mtok, record.output_price_per_mtok,
                  record.cached_input_price_per_mtok)
        record.cost_usd = (
            Decimal(str(cost)).quantize(Decimal("0.00000001")) if cost is not None
            else accounting.cost_usd(record.prompt_tokens, record.completion_tokens, prices,
                                     cached_tokens=record.cached_tokens)
        )
        record.save()
        transaction.on_commit(functools.partial(metrics.usage_corrected, counted, record))
    return record
