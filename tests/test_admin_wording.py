"""What the admin and the sign-up page say, as a person reads it: the site's name, field
labels with units, the hidden-reasoning note only where it applies, message links as
plain text cut at a word, the report's wording, the chart axis in USD, and a weak
password's error under the password it is about."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.urls import reverse

from chat.excerpt import plain_excerpt
from chat.models import Conversation, Message, UsageRecord
from chat.money import format_usd_tick

pytestmark = pytest.mark.django_db


@pytest.fixture
def answer(alice):
    conversation = Conversation.objects.create(owner=alice, title="Lighthouse", model="m")
    return Message.objects.create(
        conversation=conversation, role="assistant",
        content="## About: Write a long story about a lighthouse keeper and the **storm**",
    )


def record_of(message, **fields):
    return UsageRecord.objects.create(
        user=message.conversation.owner, conversation=message.conversation, message=message,
        model="o3-mini", status="completed", total_tokens=30, cost_usd=Decimal("0.001"),
        ttft_ms=120, duration_ms=900, **fields,
    )


def test_every_admin_page_names_the_site(admin_client):
    html = admin_client.get(reverse("admin:index")).content.decode()
    assert "Chat administration" in html and "Django administration" not in html


def test_the_record_page_labels_fields_with_their_units(admin_client, answer):
    record = record_of(answer)
    html = admin_client.get(
        reverse("admin:chat_usagerecord_change", args=[record.pk])
    ).content.decode()
    for label in ("Time to first token (ms)", "Cost (USD)", "Input price (USD per 1M tokens)",
                  "Duration (ms)"):
        assert label in html
    for raw in ("Ttft ms", "Cost usd", "Input price per mtok"):
        assert raw not in html


def test_the_hidden_reasoning_note_is_shown_only_when_the_reasoning_was_hidden(
    admin_client, answer
):
    shown = record_of(answer, reasoning_hidden=True, source="estimated")
    other = Message.objects.create(conversation=answer.conversation, role="assistant",
                                   content="Plain")
    hidden = record_of(other)
    url = "admin:chat_usagerecord_change"
    with_note = admin_client.get(reverse(url, args=[shown.pk])).content.decode()
    without = admin_client.get(reverse(url, args=[hidden.pk])).content.decode()
    assert "undercount" in with_note
    assert "undercount" not in without


def test_the_message_link_is_plain_text_cut_at_a_word(admin_client, answer):
    record = record_of(answer)
    html = admin_client.get(
        reverse("admin:chat_usagerecord_change", args=[record.pk])
    ).content.decode()
    assert "assistant (completed): About: Write a long story about a lighthouse keeper" in html
    assert "##" not in html.split("field-message", 1)[1][:400]
    assert plain_excerpt("## About: Write a long story about a lighthouse keeper", 50) == (
        "About: Write a long story about a lighthouse…"
    )


def test_the_report_explains_automatic_stops_without_developer_references(admin_client):
    html = admin_client.get(reverse("admin:chat_usagerecord_report")).content.decode()
    assert "README" not in html and "max_tokens" not in html
    assert "Answers the server stopped on its own" in html


def test_money_axis_ticks_drop_padding_zeros():
    assert [format_usd_tick(v) for v in (0, 0.1, 1, 0.0125)] == ["$0", "$0.10", "$1.00",
                                                                 "$0.0125"]


def test_a_weak_password_is_flagged_under_password_not_its_confirmation(client):
    response = client.post(reverse("signup"), {
        "username": "dave", "password1": "12345678", "password2": "12345678",
    })
    form = response.context["form"]
    assert form.errors.get("password1")
    assert "password2" not in form.errors
    html = response.content.decode()
    assert 'id="id_password1_errors"' in html and 'id="id_password2_errors"' not in html


def test_two_different_passwords_are_flagged_under_the_confirmation(client):
    response = client.post(reverse("signup"), {
        "username": "dave", "password1": "Correct-horse-9", "password2": "Correct-horse-8",
    })
    assert list(response.context["form"].errors) == ["password2"]
