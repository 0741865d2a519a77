"""Query-string filters of the API (django-filter)."""

import django_filters
from django import forms
from django.db.models import Exists, OuterRef, Q
from rest_framework import exceptions

from ..models import Conversation, Message, UsageRecord
from .fields import DateTimeFilter, TextFilter


class ConversationFilter(django_filters.FilterSet):
    """``?search=`` (case-insensitive, in titles and in the text of visible messages),
    ``?created_after=`` / ``?created_before=`` (ISO 8601 date or date-time; a time
    without offset is UTC; after is inclusive, before exclusive)."""

    search = TextFilter(
        method="filter_search", max_length=200,
        label="Text to find in the title or in the messages (case-insensitive)",
    )
    created_after = DateTimeFilter(
        field_name="created_at", lookup_expr="gte", label="Created at or after (ISO 8601)"
    )
    created_before = DateTimeFilter(
        field_name="created_at", lookup_expr="lt", label="Created before (ISO 8601)"
    )

    class Meta:
        model = Conversation
        fields = ["search", "created_after", "created_before"]

    def filter_search(self, queryset, name, value):
        value = value.strip()
        if not value:
            return queryset
        # EXISTS rather than a join: one row per conversation, no DISTINCT needed.
        in_messages = Message.objects.visible().filter(
            conversation=OuterRef("pk"), content__icontains=value
        )
        return queryset.filter(Q(title__icontains=value) | Exists(in_messages))


class UsageFilter(django_filters.FilterSet):
    """``?since=``: only generations started at or after this ISO 8601 date or date-time."""

    since = DateTimeFilter(
        field_name="created_at", lookup_expr="gte", label="Since (ISO 8601, inclusive)"
    )

    class Meta:
        model = UsageRecord
        fields = ["since"]


def messages_before(messages, before: str | None):
    """The visible ones of ``messages`` (a conversation's), with their usage; only
    those before the message ``before`` (an id: ``?before=``) when it is given. Raises
    ValidationError (400) for a ``before`` that is not a UUID, NotFound (404) for one
    that is not among ``messages``."""
    visible = messages.visible().select_related("usage")
    if before is None:
        return visible
    try:
        anchor = messages.filter(id=forms.UUIDField().clean(before)).first()
    except forms.ValidationError:
        raise exceptions.ValidationError({"before": ["A message id (UUID)."]}) from None
    if anchor is None:
        raise exceptions.NotFound("No such message in this conversation (before).")
    return visible.filter(Q(created_at__lt=anchor.created_at)
                          | Q(created_at=anchor.created_at, id__lt=anchor.id))
