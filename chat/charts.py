"""Server-side SVG charts for the admin usage report, drawn by pygal.

The SVG is inlined in the page: no front-end build, and nothing is fetched from the
network (pygal's default tooltip script comes from a CDN, so ``js=[]``).

The charts take the admin's look and theme from the page they are inlined in: pygal
writes its style as CSS inside the SVG, and ``ADMIN_STYLE`` fills it with the CSS custom
properties of Django's admin stylesheets (``--body-fg``, ``--font-family-primary``...)
on a transparent background. Those properties change with the admin's theme (the
``data-theme`` attribute its toggle sets, or ``prefers-color-scheme`` when "auto"),
so the charts follow light and dark mode without being drawn twice.
"""

from __future__ import annotations

import datetime as dt

import pygal
from django.utils.safestring import SafeString, mark_safe
from pygal.style import Style

from .money import format_usd, format_usd_tick

# Models beyond this many (the cheapest) are drawn as one "other" band.
MAX_SERIES = 8

# Series colours readable on the admin's light and dark backgrounds alike (the
# Okabe-Ito colour-blind-safe palette, then two greys).
SERIES_COLORS = (
    "#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#b8a200",
    "#7f7f7f", "#a0a0a0",
)

ADMIN_STYLE = Style(
    background="transparent",
    plot_background="transparent",
    foreground="var(--body-fg)",
    foreground_strong="var(--body-fg)",
    foreground_subtle="var(--body-quiet-color)",
    guide_stroke_color="var(--hairline-color)",
    major_guide_stroke_color="var(--border-color)",
    font_family="var(--font-family-primary)",
    title_font_size=16,
    label_font_size=12,
    major_label_font_size=12,
    legend_font_size=13,
    no_data_font_size=20,
    opacity=".9",
    opacity_hover="1",
    colors=SERIES_COLORS,
)


def _style_nonce(nonce: str):
    """A pygal XML filter (``add_xml_filter``): sets ``nonce`` on the SVG's ``<style>``."""

    def set_nonce(root):
        for element in root.iter():
            if isinstance(element.tag, str) and element.tag.rsplit("}", 1)[-1] == "style":
                element.set("nonce", nonce)
        return root

    return set_nonce


def stacked_daily_svg(
    title: str,
    days: list[dt.date],
    series: dict[str, dict[dt.date, dict]],
    key: str,
    money: bool = False,
    nonce: str | None = None,
) -> SafeString:
    """A stacked bar chart of ``series[model][day][key]`` per day, one band per model
    (``series`` ordered as wanted, e.g. by cost), as inline SVG markup in the admin's
    style (``ADMIN_STYLE``).

    ``money``: the values are USD; each value reads as ``chat.money.format_usd`` gives
    it, the axis as ``format_usd_tick`` (round ticks without trailing zeros).
    Otherwise counts, with thousands separators.

    ``nonce``: the page's Content-Security-Policy nonce (``request.csp_nonce``, the
    page's policy allowing ``'nonce-…'`` styles), set on the chart's ``<style>``: pygal
    writes its style inline, which a ``style-src 'self'`` policy refuses otherwise.

    pygal builds the document with ElementTree, which escapes model names, so the
    result is safe to insert in a page."""
    chart = pygal.StackedBar(
        js=[],
        style=ADMIN_STYLE,
        width=960,
        height=340,
        title=title,
        disable_xml_declaration=True,
        legend_at_bottom=True,
        legend_at_bottom_columns=4,
        x_label_rotation=0,
        show_minor_x_labels=False,
        truncate_legend=40,
        truncate_label=-1,
        no_data_text="No usage in this period",
        value_formatter=format_usd_tick if money else (lambda v: f"{v:,.0f}"),
        formatter=format_usd if money else (lambda v: f"{v:,.0f}"),
    )
    if nonce:
        chart.add_xml_filter(_style_nonce(nonce))
    chart.x_labels = [day.strftime("%m-%d") for day in days]
    chart.x_labels_major = [day.strftime("%m-%d") for day in days if day.weekday() == 0]
    models = list(series)
    shown, rest = models[:MAX_SERIES], models[MAX_SERIES:]
    for model in shown:
        chart.add(model, [float(series[model].get(day, {}).get(key, 0)) for day in days])
    if rest:
        chart.add(
            f"other ({len(rest)} models)",
            [float(sum(series[m].get(day, {}).get(key, 0) for m in rest)) for day in days],
        )
    # pygal returns markup it built itself with escaped text; see the docstring.
    return mark_safe(chart.render(is_unicode=True))  # noqa: S308
