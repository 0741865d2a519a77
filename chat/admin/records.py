"""Admin of the records: usage review (read-only audit trail, totals, CSV, report),
conversations with their transcript, messages. Staff need the ``view`` permission of a
model to see its pages; the usage export and report need ``chat.view_usagerecord``."""

from __future__ import annotations

import datetime as dt

from csp.constants import NONCE
from csp.decorators import csp_update
from django.contrib import admin, messages
from django.contrib.admin.options import IncorrectLookupParameters
from django.core.exceptions import PermissionDenied
from django.core.handlers.asgi import ASGIRequest
from django.db.models import (
    CharField,
    Count,
    DecimalField,
    IntegerField,
    OuterRef,
    Subquery,
    Sum,
)
from django.db.models.functions import Coalesce
from django.http import HttpResponseRedirect, StreamingHttpResponse
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html

from .. import charts, usage
from ..excerpt import plain_excerpt
from ..models import Conversation, Message, UsageRecord
from ..money import format_usd

REPORT_DAYS = 30


def csv_response(request, queryset, filename: str) -> StreamingHttpResponse:
    """Stream ``queryset`` as CSV (``chat.usage.CSV_HEADER`` columns) in chunks of
    ``usage.CSV_CHUNK_ROWS`` records, so memory stays flat whatever its size. Under ASGI
    the chunks come from an asynchronous iterator, which Django sends as produced."""
    if isinstance(request, ASGIRequest):
        content = usage.acsv_lines(queryset)
    else:
        content = usage.csv_lines(queryset)
    return StreamingHttpResponse(
        content,
        content_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


def _export_name() -> str:
    return f"usage-{timezone.now():%Y%m%d-%H%M%S}.csv"


# --- usage records ------------------------------------------------------------------------
DELETED_USER = "(deleted user)"


class UserWithRecordsFilter(admin.RelatedOnlyFieldListFilter):
    """"By user": the users who have records, then "(deleted user)" only if some records
    lost their user (``UsageRecord.user`` is set to NULL when its user is deleted).

    Django's related filter offers an "empty" choice for every nullable foreign key,
    labelled with the admin's empty mark ``-``: a stray entry when every record has a
    user, and an unreadable one when some do not. One ``EXISTS`` query per page."""

    def __init__(self, field, request, params, model, model_admin, field_path):
        super().__init__(field, request, params, model, model_admin, field_path)
        self.empty_value_display = DELETED_USER
        # Kept while selected, so a bookmarked "(deleted user)" view can be left again.
        self.has_orphans = bool(self.lookup_val_isnull) or (
            model_admin.get_queryset(request)
            .filter(**{self.lookup_kwarg_isnull: True})
            .exists()
        )

    @property
    def include_empty_choice(self):
        return getattr(self, "has_orphans", False)


class FinishReasonFilter(admin.AllValuesFieldListFilter):
    """"By finish reason": the values records have, the empty one named "(none)"
    (records older than the field, or runs that ended before any answer) instead of a
    link with no text."""

    def choices(self, changelist):
        for choice in super().choices(changelist):
            if choice["display"] == "":
                choice = {**choice, "display": "(none)"}
            yield choice


class ReadOnlyMixin:
    """No add, change or delete, for anyone: audit records and transcripts are kept
    as they were written (viewing needs the model's view permission)."""

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(UsageRecord)
class UsageRecordAdmin(ReadOnlyMixin, admin.ModelAdmin):
    """The audit trail of generations: nobody adds, changes or deletes records here.

    Above the list: totals of the filtered records. The "Export CSV" button exports the
    filtered list, the action the selected rows; "Usage report" opens a 30-day chart.
    """

    # What a review looks at first (who, which model, how it ended, what it cost), then
    # the tokens and timings folded into one column each, so the list fits a 1366 px
    # screen beside the admin's sidebar and filters without scrolling sideways.
    list_display = (
        "created", "user_and_conversation", "model", "status", "cost", "tokens", "timing",
    )
    list_display_links = ("created",)
    # The record's page, read-only: what was asked and how it ended, then the counts,
    # then the unit prices and timings.
    fields = (
        "created_at", "user", "conversation", "message", "model", "status",
        "finish_reason", "prompt_tokens", "completion_tokens", "total_tokens",
        "reasoning_tokens", "cached_tokens", "max_tokens", "source", "estimated",
        "reasoning", "cost", "input_price_per_mtok", "cached_input_price_per_mtok",
        "output_price_per_mtok", "ttft_ms", "duration_ms",
    )
    readonly_fields = ("cost", "reasoning")
    list_filter = (
        "model", "status", ("finish_reason", FinishReasonFilter), "source", "estimated",
        ("user", UserWithRecordsFilter),
    )
    date_hierarchy = "created_at"
    search_fields = ("user__username", "conversation__title")
    search_help_text = "Search by username or conversation title."
    list_select_related = ("user", "conversation")
    actions = ("export_csv",)
    ordering = ("-created_at",)


    @admin.display(description="Cost (USD)", ordering="cost_usd")
    def cost(self, record):
        return format_usd(record.cost_usd)

    @admin.display(description="Created at", ordering="created_at")
    def created(self, record):
        when = timezone.localtime(record.created_at)
        return format_html(
            '{}<br><span class="usage-detail">{}</span>', f"{when:%Y-%m-%d}", f"{when:%H:%M}"
        )

    @admin.display(description="User, conversation", ordering="user__username")
    def user_and_conversation(self, record):
        user = record.user.get_username() if record.user else DELETED_USER
        title = plain_excerpt(str(record.conversation), 32) if record.conversation else "—"
        return format_html('{}<br><span class="usage-detail">{}</span>', user, title)

    @admin.display(description="Tokens", ordering="total_tokens")
    def tokens(self, record):
        """Total, then prompt + completion, then where the counts come from (Source)."""
        return format_html(
            '{}<br><span class="usage-detail">{} + {}<br>{}</span>',
            f"{record.total_tokens:,}", f"{record.prompt_tokens:,}",
            f"{record.completion_tokens:,}", record.get_source_display().lower(),
        )

    @admin.display(description="Time (ms)", ordering="duration_ms")
    def timing(self, record):
        """The whole run, then the time to its first token."""
        first = "—" if record.ttft_ms is None else f"{record.ttft_ms:,}"
        return format_html(
            '{}<br><span class="usage-detail">first {}</span>', f"{record.duration_ms:,}", first,
        )

    @admin.display(description="Reasoning hidden")
    def reasoning(self, record):
        """Says what a hidden reasoning means only for records where it was hidden."""
        if not record.reasoning_hidden:
            return "No"
        if record.source == UsageRecord.Source.REPORTED:
            return "Yes: the provider did not stream its reasoning; it reported the tokens."
        return (
            "Yes: the provider did not stream its reasoning, so these counts, "
            f"{record.get_source_display().lower()} from what it streamed, undercount it."
        )

    # -- totals above the list ---------------------------------------------------------
    def changelist_view(self, request, extra_context=None):
        response = super().changelist_view(request, extra_context)
        context = getattr(response, "context_data", None)
        if context and "cl" in context:
            context["usage_totals"] = usage.totals(context["cl"].queryset)
        return response

    # -- CSV ---------------------------------------------------------------------------------
    @admin.action(description="Export selected usage records as CSV", permissions=["view"])
    def export_csv(self, request, queryset):
        return csv_response(request, queryset, _export_name())

    def export_view(self, request):
        """The records the changelist shows for the same query string (filters, search,
        date drill-down), all pages, as streamed CSV."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        try:
            changelist = self.get_changelist_instance(request)
        except IncorrectLookupParameters:
            self.message_user(request, "These filters are not valid.", messages.ERROR)
            return HttpResponseRedirect(reverse("admin:chat_usagerecord_changelist"))
        return csv_response(request, changelist.queryset, _export_name())

    # -- report ------------------------------------------------------------------------------
    def report_view(self, request):
        """Tokens and cost per UTC day for the last 30 days, stacked by model, the top
        users and models by cost over those days, and the runs stopped by each
        automatic stop with the tokens they saved."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        days = usage.last_days(REPORT_DAYS)
        records = UsageRecord.objects.filter(
            created_at__gte=dt.datetime.combine(days[0], dt.time.min, tzinfo=dt.UTC)
        )
        series = usage.daily_by_model(UsageRecord.objects.all(), days)
        daily = [
            {
                "day": day,
                "tokens": sum(s.get(day, {}).get("tokens", 0) for s in series.values()),
                "cost_usd": sum(s.get(day, {}).get("cost_usd", 0) for s in series.values()),
            }
            for day in reversed(days)
        ]
        changelist_url = reverse("admin:chat_usagerecord_changelist")
        # The charts' inline styles are allowed by this nonce (see get_urls).
        nonce = str(request.csp_nonce)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": f"Usage report: last {REPORT_DAYS} days",
            "days": days,
            "totals": usage.totals(records),
            "tokens_chart": charts.stacked_daily_svg(
                "Tokens per day (UTC), by model", days, series, "tokens", nonce=nonce
            ),
            "cost_chart": charts.stacked_daily_svg(
                "Cost per day (USD, UTC), by model", days, series, "cost_usd", money=True,
                nonce=nonce,
            ),
            "daily": daily,
            "top_users": usage.top(records, "user_id", "user__username"),
            "top_models": usage.top(records, "model"),
            "automatic_stops": usage.automatic_stops(records),
            "changelist_url": changelist_url,
        }
        return TemplateResponse(request, "admin/chat/usagerecord/report.html", context)

    def get_urls(self):
        wrap = self.admin_site.admin_view
        return [
            path("export/", wrap(self.export_view), name="chat_usagerecord_export"),
            # The report's charts carry their style inline: the page's policy allows
            # styles with its nonce (django-csp adds it to the header when used).
            path("report/", wrap(csp_update({"style-src": [NONCE]})(self.report_view)),
                 name="chat_usagerecord_report"),
            *super().get_urls(),
        ]


# --- conversations --------------------------------------------------------------------------
def _last_run(field: str):
    """Subquery: ``field`` of the conversation's newest assistant message."""
    return Subquery(
        Message.objects.filter(conversation=OuterRef("pk"), role=Message.Role.ASSISTANT)
        .order_by("-created_at")
        .values(field)[:1],
        output_field=CharField(),
    )


class LastRunStatusFilter(admin.SimpleListFilter):
    """Conversations whose newest assistant answer has the chosen status."""

    title = "status of the last run"
    parameter_name = "last_run"

    def lookups(self, request, model_admin):
        return [*Message.Status.choices, ("none", "No run yet")]

    def queryset(self, request, queryset):
        value = self.value()
        if value == "none":
            return queryset.filter(last_run_status__isnull=True)
        if value in Message.Status.values:
            return queryset.filter(last_run_status=value)
        return queryset


class TranscriptInline(ReadOnlyMixin, admin.TabularInline):
    """The conversation's messages in order, read-only (superseded ones included and
    marked, since the audit needs them)."""

    model = Message
    verbose_name = "message"
    verbose_name_plural = "transcript"
    fields = (
        "created_at", "role", "status", "superseded", "reasoning", "content", "model",
        "finish_reason", "tokens", "cost", "error",
    )
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = False
    ordering = ("created_at",)

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("usage")


    @admin.display(description="tokens")
    def tokens(self, message):
        record = getattr(message, "usage", None) if message.role == "assistant" else None
        return record.total_tokens if record else ""

    @admin.display(description="cost (USD)")
    def cost(self, message):
        record = getattr(message, "usage", None) if message.role == "assistant" else None
        return format_usd(record.cost_usd) if record else ""


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    """Conversations with their size, cost and last run; the transcript is read-only.
    Conversations are created by chatting, not here."""

    list_display = (
        "__str__", "owner", "model", "message_count", "total_cost", "last_run_status",
        "last_activity",
    )
    list_filter = (LastRunStatusFilter, "model")
    list_select_related = ("owner",)
    search_fields = ("title", "owner__username")
    search_help_text = "Search by title or owner's username."
    # Only the title may be edited: the rest is what the user chose, kept as it was.
    readonly_fields = (
        "id", "owner", "model", "system_prompt", "repetition_guard", "max_answer_usd",
        "max_answer_tokens", "created_at", "updated_at",
    )
    fields = (
        "id", "owner", "title", "model", "system_prompt", "repetition_guard",
        "max_answer_usd", "max_answer_tokens", "created_at", "updated_at",
    )
    inlines = (TranscriptInline,)
    date_hierarchy = "updated_at"

    def get_queryset(self, request):
        # Subqueries rather than joins: counting messages and summing costs over two
        # joins would multiply each other's rows.
        messages_count = (
            Message.objects.filter(conversation=OuterRef("pk"))
            .order_by()
            .values("conversation")
            .annotate(n=Count("pk"))
            .values("n")
        )
        cost = (
            UsageRecord.objects.filter(conversation=OuterRef("pk"))
            .order_by()
            .values("conversation")
            .annotate(total=Sum("cost_usd"))
            .values("total")
        )
        return (
            super()
            .get_queryset(request)
            .annotate(
                message_count=Coalesce(Subquery(messages_count, output_field=IntegerField()), 0),
                total_cost=Subquery(
                    cost, output_field=DecimalField(max_digits=20, decimal_places=8)
                ),
                last_run_status=_last_run("status"),
            )
        )

    def has_add_permission(self, request):
        return False

    @admin.display(description="messages", ordering="message_count")
    def message_count(self, conversation):
        return conversation.message_count

    @admin.display(description="total cost (USD)", ordering="total_cost")
    def total_cost(self, conversation):
        return format_usd(conversation.total_cost or 0)

    @admin.display(description="last run", ordering="last_run_status")
    def last_run_status(self, conversation):
        return conversation.last_run_status or "—"

    @admin.display(description="last activity", ordering="updated_at")
    def last_activity(self, conversation):
        return conversation.updated_at


@admin.register(Message)
class MessageAdmin(ReadOnlyMixin, admin.ModelAdmin):
    """Every message, read-only: they are written by generations only."""

    list_display = ("short", "conversation", "role", "status", "model", "superseded", "created_at")
    list_filter = ("role", "status", "model", "superseded")
    list_select_related = ("conversation",)
    search_fields = ("content", "conversation__title", "conversation__owner__username")
    date_hierarchy = "created_at"


    @admin.display(description="content")
    def short(self, message):
        return plain_excerpt(message.content, 80)
