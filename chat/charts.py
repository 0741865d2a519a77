"""Server-side SVG charts for the admin usage report, drawn by pygal.

The SVG is inlined in the page: no front-end build, and nothing is fetched from the
network (pygal's default tooltip script comes from a CDN, so ``js=[]``).
"""

from __future__ import annotations

import datetime as dt

import pygal
from django.utils.safestring import SafeString, mark_safe
from pygal.style import DefaultStyle

# Models beyond this many (the cheapest) are drawn as one "other" band.
MAX_SERIES = 8


def stacked_daily_svg(
    title: str,
    days: list[dt.date],
    series: dict[str, dict[dt.date, dict]],
    key: str,
    value_formatter=None,
) -> SafeString:
    """A stacked bar chart of ``series[model][day][key]`` per day, one band per model
    (``series`` ordered as wanted, e.g. by cost), as inline SVG markup.

    pygal builds the document with ElementTree, which escapes model names, so the
    result is safe to insert in a page."""
    chart = pygal.StackedBar(
        js=[],
        style=DefaultStyle,
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
        value_formatter=value_formatter or (lambda v: f"{v:,.0f}"),
    )
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
