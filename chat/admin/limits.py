"""Admin of the limits: model prices and per-user budgets."""

from __future__ import annotations

from django import forms
from django.contrib import admin
from django.db.models import Exists, OuterRef, Q
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html

from ..generation import budgets
from ..models import ModelPrice, UserBudget
from ..money import format_usd


# --- prices and budgets ------------------------------------------------------------------------
class ModelPriceForm(forms.ModelForm):
    """Prices in USD per 1M tokens; negative prices are refused."""

    input_per_mtok = forms.DecimalField(
        min_value=0, max_digits=12, decimal_places=6, label="USD per 1M input tokens"
    )
    output_per_mtok = forms.DecimalField(
        min_value=0, max_digits=12, decimal_places=6, label="USD per 1M output tokens"
    )
    cached_input_per_mtok = forms.DecimalField(
        min_value=0, max_digits=12, decimal_places=6, required=False,
        label="USD per 1M cached input tokens",
        help_text="Prompt tokens the provider served from its cache; empty: the input price.",
    )

    class Meta:
        model = ModelPrice
        fields = ("model", "input_per_mtok", "cached_input_per_mtok", "output_per_mtok",
                  "valid_from")


@admin.register(ModelPrice)
class ModelPriceAdmin(admin.ModelAdmin):
    """USD per 1M tokens by model name or prefix. To change a price from a date on, add a
    row with that ``valid_from``: usage records keep the unit prices they were charged."""

    form = ModelPriceForm
    list_display = ("model", "input_per_mtok", "cached_input_per_mtok", "output_per_mtok",
                    "valid_from", "in_effect")
    list_filter = ("model",)
    search_fields = ("model",)
    ordering = ("model", "-valid_from")

    def get_queryset(self, request):
        now = timezone.now()
        newer = ModelPrice.objects.filter(
            model=OuterRef("model"), valid_from__gt=OuterRef("valid_from"), valid_from__lte=now
        )
        return super().get_queryset(request).annotate(
            is_current=Q(valid_from__lte=now) & ~Exists(newer)
        )

    @admin.display(boolean=True, description="in effect now", ordering="is_current")
    def in_effect(self, price):
        """The row used now for its model name: the newest one already valid."""
        return price.is_current


UNLIMITED = (
    "Empty: unlimited. A request counts its prompt plus max_tokens (or less, up to its "
    "per-answer ceiling)."
)


def _limit(usd) -> str | None:
    # None lets the admin show its "empty" mark, as for the token limits beside it.
    return None if usd is None else format_usd(usd)


class UserBudgetForm(forms.ModelForm):
    """Budget limits; empty means unlimited, negative USD limits are refused."""

    usd_per_day = forms.DecimalField(
        required=False, min_value=0, max_digits=12, decimal_places=4, label="USD per day",
        help_text=UNLIMITED,
    )
    usd_per_month = forms.DecimalField(
        required=False, min_value=0, max_digits=12, decimal_places=4, label="USD per month",
        help_text=UNLIMITED,
    )
    max_answer_usd = forms.DecimalField(
        required=False, min_value=0, max_digits=14, decimal_places=8, label="USD per answer",
        help_text="Empty: no ceiling. An answer is stopped when its cost (prompt plus "
        "answer) reaches this (finish reason cost_limit), and each request reserves at "
        "most this much of the limits above. A conversation's own ceiling or the "
        "server's (CHAT_MAX_ANSWER_USD) applies when lower.",
    )

    class Meta:
        model = UserBudget
        fields = (
            "user", "tokens_per_day", "usd_per_day", "tokens_per_month", "usd_per_month",
            "max_concurrent", "max_answer_usd",
        )
        labels = {"max_concurrent": "Concurrent generations"}
        help_texts = {
            "tokens_per_day": UNLIMITED, "tokens_per_month": UNLIMITED,
            "max_concurrent": "Answers streaming at once across all tabs and servers; "
                              "0 suspends the user.",
        }


@admin.register(UserBudget)
class UserBudgetAdmin(admin.ModelAdmin):
    """Per-user limits: tokens and USD per UTC day and month (empty = unlimited) and the
    number of generations allowed at once (users without a row get 1)."""

    list_display = (
        "user", "tokens_per_day", "usd_day", "tokens_per_month", "usd_month",
        "max_concurrent", "usd_answer",
    )
    list_select_related = ("user",)
    form = UserBudgetForm
    search_fields = ("user__username",)
    autocomplete_fields = ("user",)
    readonly_fields = ("used_now",)
    fieldsets = (
        (None, {"fields": ("user",)}),
        ("Per UTC day", {"fields": ("tokens_per_day", "usd_per_day")}),
        ("Per UTC month", {"fields": ("tokens_per_month", "usd_per_month")}),
        ("Concurrency", {"fields": ("max_concurrent",)}),
        ("Per answer", {"fields": ("max_answer_usd",)}),
        ("Usage", {"fields": ("used_now",)}),
    )

    @admin.display(description="USD per day", ordering="usd_per_day")
    def usd_day(self, budget):
        return _limit(budget.usd_per_day)

    @admin.display(description="USD per month", ordering="usd_per_month")
    def usd_month(self, budget):
        return _limit(budget.usd_per_month)

    @admin.display(description="USD per answer", ordering="max_answer_usd")
    def usd_answer(self, budget):
        return _limit(budget.max_answer_usd)

    @admin.display(description="used so far")
    def used_now(self, budget):
        if budget is None or budget.user_id is None:
            return "—"
        periods = budgets.Periods.at(timezone.now())
        used = budgets.used(budget.user, periods)
        return format_html(
            "Today: {} tokens, {}. This month: {} tokens, {}. "
            '<a href="{}?user__id__exact={}">Usage records</a>',
            f"{used.tokens_day:,}", format_usd(used.usd_day),
            f"{used.tokens_month:,}", format_usd(used.usd_month),
            reverse("admin:chat_usagerecord_changelist"), budget.user_id,
        )
