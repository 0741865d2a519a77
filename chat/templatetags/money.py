"""``{% load money %}`` then ``{{ amount|usd }}``: the one USD format for people
(``chat.money.format_usd``)."""

from django import template

from chat.money import format_usd

register = template.Library()


@register.filter
def usd(value) -> str:
    """``value`` (USD) formatted by ``chat.money.format_usd``, e.g. ``$0.000225``."""
    return format_usd(value)
