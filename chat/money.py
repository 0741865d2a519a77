"""USD amounts as people read them, and as machines read them.

Two formats, each implemented once (``format_usd_tick`` is ``format_usd`` for chart
axes, trimmed):

- ``format_usd`` is the one format for people (admin lists, totals, the usage report and
  its charts, budget pages and messages). It is the format the chat page already uses
  under each answer (``formatCost`` in ``static/chat/chat.js``), so an amount reads the
  same wherever it is shown.
- ``plain_decimal`` is for files and APIs (the CSV export): every stored digit, never an
  exponent. ``Decimal`` prints a zero stored with 8 decimal places as ``0E-8``, which
  spreadsheets and scripts misread.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

CENT = Decimal("0.01")
# The smallest amount shown below a cent: 6 decimal places, i.e. a millionth of a dollar.
MICRO = Decimal("0.000001")
EMPTY = "—"


def format_usd(value) -> str:
    """A USD amount for people, e.g. in the admin.

    ``value``: ``Decimal``, ``int``, ``float`` or a decimal string, in USD; ``None`` or
    something not a number gives ``"—"``. The rule (rounded half up):

    - zero: ``"$0"``;
    - a cent or more: 4 decimal places, thousands separated: ``"$0.0123"``,
      ``"$1,234.5000"``;
    - below a cent: up to 6 decimal places, trailing zeros dropped, so small per-answer
      costs keep their significant digits: ``"$0.0075"``, ``"$0.000225"``;
    - below half a millionth (but not zero): ``"<$0.000001"``;
    - a negative amount (a refund, a correction) gets a leading ``-``: ``"-$0.0100"``.
    """
    if value is None or isinstance(value, bool):
        return EMPTY
    try:
        amount = Decimal(str(value)) if not isinstance(value, Decimal) else value
    except (InvalidOperation, ValueError):
        return EMPTY
    if not amount.is_finite():
        return EMPTY
    if amount.is_zero():
        return "$0"
    sign, amount = ("-" if amount < 0 else ""), abs(amount)
    rounded = amount.quantize(MICRO, ROUND_HALF_UP)
    if rounded >= CENT:
        return f"{sign}${amount.quantize(Decimal('0.0001'), ROUND_HALF_UP):,}"
    if rounded.is_zero():
        return f"{sign}<${MICRO}"
    return f"{sign}${format(rounded, 'f').rstrip('0')}"


def format_usd_tick(value) -> str:
    """A chart axis tick in USD: ``format_usd``, with the zeros that only pad its 4
    decimal places dropped down to whole cents, since ticks are round numbers:
    ``0.1`` gives ``"$0.10"`` (``format_usd``: ``"$0.1000"``), ``1`` ``"$1.00"``,
    ``0.0125`` ``"$0.0125"``, ``0.005`` ``"$0.005"``, ``0`` ``"$0"``."""
    text = format_usd(value)
    head, dot, decimals = text.partition(".")
    if not dot or len(decimals) != 4 or text.startswith(("<", "-<")):
        return text
    return f"{head}.{decimals[:2]}{decimals[2:].rstrip('0')}"


def plain_decimal(value) -> str:
    """``value`` (a ``Decimal`` or number) as a plain decimal string with every digit it
    has, never in exponent notation: ``Decimal("0E-8")`` gives ``"0.00000000"``,
    ``Decimal("0.00012500")`` gives ``"0.00012500"``. ``None`` gives ``""``."""
    if value is None:
        return ""
    return format(value if isinstance(value, Decimal) else Decimal(str(value)), "f")
