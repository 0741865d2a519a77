"""The Django admin for usage review, prices and budgets, as staff use it: real requests
through the admin site (django.test.Client), real database rows."""

import csv
import datetime as dt
import io
import re
from decimal import Decimal

import pytest
from django.apps import apps as django_apps
from django.contrib.auth.models import Permission
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from chat import generation, usage
from chat.models import Conversation, Message, ModelPrice, UsageRecord, UserBudget
from chat.money import format_usd

pytestmark = pytest.mark.django_db

CHANGELIST = "admin:chat_usagerecord_changelist"
EXPORT = "admin:chat_usagerecord_export"
REPORT = "admin:chat_usagerecord_report"


# --- helpers ---------------------------------------------------------------------------------
def make_record(user, *, model="gpt-4o-mini", status="completed", prompt=100, completion=50,
                cost="0.001", estimated=False, title="A chat", created_at=None, conversation=None,
                source=None, reasoning=0, cached=0, finish_reason=""):
    conversation = conversation or Conversation.objects.create(owner=user, title=title,
                                                               model=model)
    return UsageRecord.objects.create(
        user=user, conversation=conversation, model=model, status=status,
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
        estimated=estimated, cost_usd=Decimal(cost), ttft_ms=120, duration_ms=900,
        created_at=created_at or timezone.now(),
        source=source or ("estimated" if estimated else "reported"),
        reasoning_tokens=reasoning, cached_tokens=cached,
        finish_reason=finish_reason or {"completed": "stop", "cancelled": "cancelled"}.get(
            status, "error"),
    )


@pytest.fixture
def records(alice, bob):
    """A mix of users, models and statuses: 6 records."""
    return [
        make_record(alice, model="gpt-4o", status="completed", prompt=1000, completion=500,
                    cost="0.0075", title="Alice's big question"),
        make_record(alice, model="gpt-4o", status="cancelled", prompt=800, completion=20,
                    cost="0.0022", estimated=True, title="Stopped early", source="tokenized"),
        make_record(alice, model="gpt-4o-mini", status="completed", prompt=300, completion=300,
                    cost="0.000225", reasoning=120, cached=256, finish_reason="length"),
        make_record(bob, model="gpt-4o", status="failed", prompt=50, completion=0,
                    cost="0.000125", title="Bob failed"),
        make_record(bob, model="gpt-4o", status="cancelled", prompt=400, completion=10,
                    cost="0.0011", estimated=True, title="Bob stopped"),
        make_record(bob, model="gpt-4o-mini", status="completed", prompt=10, completion=10,
                    cost="0.0000075", title="Bob small"),
    ]


@pytest.fixture
def staff_viewer(django_user_model):
    """A staff member who may only view usage records."""
    user = django_user_model.objects.create_user("viewer", password="viewer-password-1",
                                                 is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_usagerecord"))
    return user


def streamed_text(response) -> str:
    assert response.streaming
    return b"".join(response.streaming_content).decode()


def csv_rows(response) -> list[dict]:
    return list(csv.DictReader(io.StringIO(streamed_text(response))))


# --- who may see what ------------------------------------------------------------------------
def test_staff_sees_the_usage_list_with_every_column(admin_client, records):
    response = admin_client.get(reverse(CHANGELIST))
    assert response.status_code == 200
    html = response.content.decode()
    # Review columns first; tokens and timings folded into one column each.
    for header in ("Created at", "User, conversation", "Model", "Status", "Cost (USD)",
                   "Tokens", "Time (ms)"):
        assert header in html
    assert "Ttft ms" not in html and "Cost usd" not in html
    assert "Alice&#x27;s big question" in html and "Bob small" in html
    assert len(response.context["cl"].result_list) == 6


@pytest.mark.parametrize("name", [CHANGELIST, EXPORT, REPORT])
def test_non_staff_users_are_sent_to_the_admin_login(client, alice, records, name):
    client.force_login(alice)
    response = client.get(reverse(name))
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))


@pytest.mark.parametrize("name", [CHANGELIST, EXPORT, REPORT])
def test_staff_without_the_view_permission_are_refused(client, django_user_model, records, name):
    clerk = django_user_model.objects.create_user("clerk", password="clerk-pass-1", is_staff=True)
    client.force_login(clerk)
    assert client.get(reverse(name)).status_code == 403


def test_a_viewer_sees_usage_but_cannot_add_change_or_delete_records(client, staff_viewer,
                                                                       records):
    client.force_login(staff_viewer)
    assert client.get(reverse(CHANGELIST)).status_code == 200
    assert client.get(reverse(REPORT)).status_code == 200
    record = records[0]
    assert client.get(reverse("admin:chat_usagerecord_add")).status_code == 403
    assert client.get(reverse("admin:chat_usagerecord_delete", args=[record.pk])).status_code == 403
    response = client.post(
        reverse("admin:chat_usagerecord_change", args=[record.pk]), {"total_tokens": 1}
    )
    assert response.status_code == 403
    record.refresh_from_db()
    assert record.total_tokens == 1500


def test_even_a_superuser_cannot_edit_or_delete_the_audit_trail(admin_client, records):
    record = records[0]
    assert admin_client.get(reverse("admin:chat_usagerecord_add")).status_code == 403
    page = admin_client.get(reverse("admin:chat_usagerecord_change", args=[record.pk]))
    assert page.status_code == 200
    assert 'name="_save"' not in page.content.decode()
    response = admin_client.post(reverse(CHANGELIST), {
        "action": "delete_selected", "_selected_action": [record.pk],
    })
    assert UsageRecord.objects.filter(pk=record.pk).exists()
    assert response.status_code in (200, 302)


# --- totals and CSV --------------------------------------------------------------------------
def expected_totals(rows):
    runs = len(rows)
    stopped = sum(1 for r in rows if r.status == "cancelled")
    return {
        "runs": runs,
        "prompt_tokens": sum(r.prompt_tokens for r in rows),
        "completion_tokens": sum(r.completion_tokens for r in rows),
        "total_tokens": sum(r.total_tokens for r in rows),
        "cost_usd": sum((r.cost_usd for r in rows), Decimal(0)),
        "stopped": stopped,
    }


@pytest.mark.parametrize("query, keep", [
    ("", lambda r: True),
    ("?model=gpt-4o", lambda r: r.model == "gpt-4o"),
    ("?model=gpt-4o&status__exact=cancelled", lambda r: r.model == "gpt-4o"
                                                      and r.status == "cancelled"),
    ("?q=bob", lambda r: r.user.username == "bob"),
    ("?q=stopped", lambda r: "stopped" in r.conversation.title.lower()),
    ("?estimated__exact=1", lambda r: r.estimated),
    ("?source__exact=tokenized", lambda r: r.source == "tokenized"),
    ("?source__exact=estimated", lambda r: r.source == "estimated"),
])
def test_totals_above_the_list_match_the_filtered_records(admin_client, records, query, keep):
    response = admin_client.get(reverse(CHANGELIST) + query)
    assert response.status_code == 200
    rows = [r for r in records if keep(r)]
    expected = expected_totals(rows)
    totals = response.context["usage_totals"]
    for key, value in expected.items():
        assert totals[key] == value, key
    html = response.content.decode()
    shown = dict(re.findall(r'data-total="(\w+)">([^<]*)<', html))
    assert shown["runs"] == f"{expected['runs']:,}"
    assert shown["total_tokens"] == f"{expected['total_tokens']:,}"  # 12,345
    assert shown["cost_usd"] == format_usd(expected["cost_usd"])
    share = round(100 * expected["stopped"] / expected["runs"]) if rows else 0
    assert shown["stopped_share"] == f"{expected['stopped']} ({share}%)"


def test_share_of_stopped_runs_counts_cancelled_runs(records):
    totals = usage.totals(UsageRecord.objects.all())
    assert totals["stopped"] == 2
    assert totals["stopped_share"] == pytest.approx(2 / 6)


def test_the_date_drilldown_filters_the_totals(admin_client, alice, records):
    old = make_record(alice, created_at=timezone.now() - dt.timedelta(days=400), cost="1")
    year = old.created_at.year
    response = admin_client.get(reverse(CHANGELIST) + f"?created_at__year={year}")
    assert response.context["usage_totals"]["runs"] == 1
    assert response.context["usage_totals"]["cost_usd"] == Decimal("1")


@pytest.mark.parametrize("query, keep", [
    ("", lambda r: True),
    ("?model=gpt-4o&status__exact=cancelled", lambda r: r.model == "gpt-4o"
                                                      and r.status == "cancelled"),
    ("?q=alice", lambda r: r.user.username == "alice"),
])
def test_the_export_button_downloads_the_filtered_records_as_csv(admin_client, records, query,
                                                                   keep):
    response = admin_client.get(reverse(EXPORT) + query)
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/csv")
    assert "attachment" in response["Content-Disposition"]
    rows = csv_rows(response)
    expected = [r for r in records if keep(r)]
    assert {int(row["id"]) for row in rows} == {r.pk for r in expected}
    assert sum(Decimal(row["cost_usd"]) for row in rows) == expected_totals(expected)["cost_usd"]
    assert sum(int(row["total_tokens"]) for row in rows) == sum(r.total_tokens for r in expected)
    by_id = {r.pk: r for r in expected}
    for row in rows:
        record = by_id[int(row["id"])]
        assert row["username"] == record.user.username
        assert row["status"] == record.status
        assert row["conversation_title"] == record.conversation.title
        assert row["estimated"] == ("true" if record.estimated else "false")
        assert row["source"] == record.source
        assert row["finish_reason"] == record.finish_reason
        assert int(row["reasoning_tokens"]) == record.reasoning_tokens
        assert int(row["cached_tokens"]) == record.cached_tokens


def test_the_list_shows_where_each_record_s_numbers_come_from(admin_client, records):
    response = admin_client.get(reverse(CHANGELIST))
    html = response.content.decode()
    # Under each record's token counts (the Tokens column).
    assert html.count("<br>tokenized</span>") == 1
    assert html.count("<br>estimated</span>") == 1
    assert html.count("<br>reported</span>") == 4
    filters = admin_client.get(reverse(CHANGELIST) + "?source__exact=tokenized")
    assert [r.pk for r in filters.context["cl"].result_list] == [records[1].pk]


def test_the_changelist_links_the_export_with_its_current_filters(admin_client, records):
    html = admin_client.get(reverse(CHANGELIST) + "?model=gpt-4o&q=bob").content.decode()
    link = re.search(r'href="([^"]*/export/[^"]*)"', html).group(1).replace("&amp;", "&")
    assert "model=gpt-4o" in link and "q=bob" in link
    rows = csv_rows(admin_client.get(link))
    assert {int(r["id"]) for r in rows} == {
        r.pk for r in records if r.model == "gpt-4o" and r.user.username == "bob"
    }


def test_the_export_action_downloads_the_selected_records(admin_client, records):
    chosen = [records[0].pk, records[4].pk]
    response = admin_client.post(reverse(CHANGELIST), {
        "action": "export_csv", "_selected_action": chosen,
    })
    assert response.status_code == 200
    assert sorted(int(r["id"]) for r in csv_rows(response)) == sorted(chosen)


def test_the_csv_is_streamed_in_bounded_chunks(admin_client, alice, monkeypatch):
    conversation = Conversation.objects.create(owner=alice, title="many")
    for _ in range(50):
        make_record(alice, conversation=conversation)
    monkeypatch.setattr(usage.csv_chunk, "__defaults__", (7,))
    response = admin_client.get(reverse(EXPORT))
    chunks = list(response.streaming_content)
    # The header, then ceil(50 / 7) = 8 chunks of at most 7 rows each.
    assert len(chunks) == 1 + 8
    assert all(chunk.decode().count("\n") <= 7 for chunk in chunks[1:])
    rows = list(csv.DictReader(io.StringIO(b"".join(chunks).decode())))
    assert len({r["id"] for r in rows}) == 50


def test_csv_cells_that_look_like_formulas_are_neutralised(admin_client, alice):
    make_record(alice, title="=HYPERLINK(\"http://evil.example\",\"x\")")
    rows = csv_rows(admin_client.get(reverse(EXPORT)))
    assert rows[0]["conversation_title"].startswith("'=")


def test_an_invalid_filter_on_export_redirects_with_an_error(admin_client, records):
    response = admin_client.get(reverse(EXPORT) + "?estimated__exact=maybe")
    assert response.status_code == 302
    assert response["Location"] == reverse(CHANGELIST)


def test_the_usage_list_runs_the_same_number_of_queries_for_5_or_50_records(
    admin_client, alice, bob
):
    def queries_for(count):
        UsageRecord.objects.all().delete()
        for n in range(count):
            make_record(alice if n % 2 else bob, model=f"model-{n % 3}",
                        title=f"chat {n}", status="cancelled" if n % 4 == 0 else "completed")
        with CaptureQueriesContext(connection) as captured:
            response = admin_client.get(reverse(CHANGELIST))
        assert response.status_code == 200
        assert len(response.context["cl"].result_list) == count
        return len(captured.captured_queries)

    few, many = queries_for(5), queries_for(50)
    print(f"usage changelist: {few} queries for 5 records, {many} for 50")
    assert few == many


# --- report ---------------------------------------------------------------------------------
def test_the_report_charts_30_days_by_model_and_ranks_users_and_models_by_cost(
    admin_client, alice, bob, records
):
    make_record(bob, model="gpt-4o", cost="0.5", created_at=timezone.now() - dt.timedelta(days=3))
    make_record(bob, model="gpt-4.1", cost="9", created_at=timezone.now() - dt.timedelta(days=45))
    response = admin_client.get(reverse(REPORT))
    assert response.status_code == 200
    html = response.content.decode()
    assert html.count('class="pygal-chart"') == 2
    assert "Tokens per day" in html and "Cost per day" in html
    # Legends name the models of the period; the 45-day-old model is outside it.
    assert "gpt-4o-mini" in html and "gpt-4.1" not in html
    # Nothing is loaded from the network: no external scripts, styles or images.
    assert not re.search(r'(src|href)="(https?:)?//', html)
    users = [row["user__username"] for row in response.context["top_users"]]
    assert users == ["bob", "alice"]
    assert response.context["top_users"][0]["cost_usd"] == Decimal("0.5012325")
    models = [row["model"] for row in response.context["top_models"]]
    assert models == ["gpt-4o", "gpt-4o-mini"]
    assert len(response.context["days"]) == 30
    assert response.context["days"][-1] == timezone.now().astimezone(dt.UTC).date()
    today = response.context["daily"][0]
    assert today["tokens"] == sum(r.total_tokens for r in records)


def test_the_usage_list_links_to_the_report(admin_client, records):
    html = admin_client.get(reverse(CHANGELIST)).content.decode()
    assert f'href="{reverse(REPORT)}"' in html


def test_the_report_renders_with_no_usage(admin_client):
    response = admin_client.get(reverse(REPORT))
    assert response.status_code == 200
    assert "No usage in this period" in response.content.decode()


# --- conversations --------------------------------------------------------------------------
def conversation_with_runs(user, title, statuses, cost="0.001"):
    conversation = Conversation.objects.create(owner=user, title=title, model="gpt-4o")
    start = timezone.now() - dt.timedelta(minutes=10)
    for n, status in enumerate(statuses):
        Message.objects.create(conversation=conversation, role="user", content=f"q{n}",
                               created_at=start + dt.timedelta(seconds=2 * n))
        answer = Message.objects.create(conversation=conversation, role="assistant",
                                        content=f"a{n}", status=status, model="gpt-4o",
                                        created_at=start + dt.timedelta(seconds=2 * n + 1))
        UsageRecord.objects.create(user=user, conversation=conversation, message=answer,
                                   model="gpt-4o", status=status, prompt_tokens=10,
                                   completion_tokens=5, total_tokens=15,
                                   cost_usd=Decimal(cost))
    return conversation


def test_conversations_show_message_count_cost_and_last_run(admin_client, alice, bob):
    first = conversation_with_runs(alice, "Two runs, last stopped", ["completed", "cancelled"])
    second = conversation_with_runs(bob, "One failed run", ["failed"], cost="0.5")
    empty = Conversation.objects.create(owner=bob, title="Never answered")
    response = admin_client.get(reverse("admin:chat_conversation_changelist"))
    assert response.status_code == 200
    rows = {c.pk: c for c in response.context["cl"].result_list}
    assert rows[first.pk].message_count == 4
    assert rows[first.pk].total_cost == Decimal("0.002")
    assert rows[first.pk].last_run_status == "cancelled"
    assert rows[second.pk].message_count == 2 and rows[second.pk].last_run_status == "failed"
    assert rows[empty.pk].message_count == 0 and rows[empty.pk].last_run_status is None
    html = response.content.decode()
    assert ">$0.002<" in html and "alice" in html


@pytest.mark.parametrize("status, expected", [
    ("cancelled", {"stopped"}), ("failed", {"failed"}), ("completed", {"done"}), ("none", {"new"}),
])
def test_conversations_filter_by_the_status_of_their_last_run(admin_client, alice, status,
                                                                expected):
    conversation_with_runs(alice, "stopped", ["completed", "cancelled"])
    conversation_with_runs(alice, "failed", ["cancelled", "failed"])
    conversation_with_runs(alice, "done", ["failed", "completed"])
    Conversation.objects.create(owner=alice, title="new")
    response = admin_client.get(reverse("admin:chat_conversation_changelist")
                                + f"?last_run={status}")
    assert {c.title for c in response.context["cl"].result_list} == expected


def test_the_conversation_list_runs_the_same_number_of_queries_for_3_or_30(admin_client, alice):
    def queries_for(count):
        Conversation.objects.all().delete()
        for n in range(count):
            conversation_with_runs(alice, f"c{n}", ["completed", "cancelled"][: 1 + n % 2])
        with CaptureQueriesContext(connection) as captured:
            assert admin_client.get(
                reverse("admin:chat_conversation_changelist")
            ).status_code == 200
        return len(captured.captured_queries)

    assert queries_for(3) == queries_for(30)


def test_the_transcript_is_read_only(admin_client, alice):
    conversation = conversation_with_runs(alice, "Transcript", ["completed", "cancelled"])
    url = reverse("admin:chat_conversation_change", args=[conversation.pk])
    response = admin_client.get(url)
    assert response.status_code == 200
    html = response.content.decode()
    for text in ("q0", "a0", "q1", "a1"):
        assert text in html
    assert "messages-0-content" not in html  # no editable message field
    assert "messages-__prefix__" not in html  # no empty form to add a message
    formset = response.context["inline_admin_formsets"][0]
    assert not formset.has_add_permission and not formset.has_delete_permission
    assert not formset.has_change_permission


# --- prices ---------------------------------------------------------------------------------
def record_at_current_prices(alice, model="test-model"):
    conversation = Conversation.objects.create(owner=alice, title="priced", model=model)
    message = Message.objects.create(conversation=conversation, role="assistant",
                                     status="streaming", model=model)
    return generation.finalize(
        generation.RunRef(message.id, conversation.id, alice.id, model, prompt=None),
        generation.Outcome("completed", "stop", usage={"prompt_tokens": 1000,
                                                       "completion_tokens": 2000},
                           ttft_ms=10, duration_ms=20),
        content="answer",
    )


def test_editing_a_price_in_the_admin_changes_only_later_records(admin_client, alice):
    price = ModelPrice.objects.create(model="test-model", input_per_mtok=Decimal("1"),
                                      output_per_mtok=Decimal("2"),
                                      valid_from=timezone.now() - dt.timedelta(days=1))
    before = record_at_current_prices(alice)
    assert before.cost_usd == Decimal("0.005")  # 1000 * $1/M + 2000 * $2/M

    response = admin_client.post(reverse("admin:chat_modelprice_change", args=[price.pk]), {
        "model": "test-model", "input_per_mtok": "10", "output_per_mtok": "20",
        "valid_from_0": price.valid_from.strftime("%Y-%m-%d"),
        "valid_from_1": price.valid_from.strftime("%H:%M:%S"),
    })
    assert response.status_code == 302, response.content.decode()[:2000]
    after = record_at_current_prices(alice)

    before.refresh_from_db()
    assert (before.input_price_per_mtok, before.output_price_per_mtok) == (1, 2)
    assert before.cost_usd == Decimal("0.005")
    assert (after.input_price_per_mtok, after.output_price_per_mtok) == (10, 20)
    assert after.cost_usd == Decimal("0.05")


def test_a_price_valid_from_later_applies_from_then_on(alice):
    ModelPrice.objects.create(model="test-", input_per_mtok=1, output_per_mtok=1,
                              valid_from=timezone.now() - dt.timedelta(days=10))
    upcoming = ModelPrice.objects.create(model="test-", input_per_mtok=3, output_per_mtok=3,
                                         valid_from=timezone.now() + dt.timedelta(days=1))
    first = record_at_current_prices(alice)
    assert first.input_price_per_mtok == 1
    upcoming.valid_from = timezone.now() - dt.timedelta(seconds=1)
    upcoming.save()
    second = record_at_current_prices(alice)
    first.refresh_from_db()
    assert (first.input_price_per_mtok, second.input_price_per_mtok) == (1, 3)


def test_the_price_list_marks_the_rows_in_effect(admin_client):
    old = ModelPrice.objects.create(model="m", input_per_mtok=1, output_per_mtok=1,
                                    valid_from=timezone.now() - dt.timedelta(days=2))
    current = ModelPrice.objects.create(model="m", input_per_mtok=2, output_per_mtok=2,
                                        valid_from=timezone.now() - dt.timedelta(days=1))
    future = ModelPrice.objects.create(model="m", input_per_mtok=3, output_per_mtok=3,
                                       valid_from=timezone.now() + dt.timedelta(days=1))
    response = admin_client.get(reverse("admin:chat_modelprice_changelist") + "?model=m")
    flags = {p.pk: p.is_current for p in response.context["cl"].result_list}
    assert flags == {old.pk: False, current.pk: True, future.pk: False}


def test_the_seed_migration_fills_prices_from_settings_once(settings):
    from importlib import import_module

    migration = import_module("chat.migrations.0002_admin_seed_prices")
    ModelPrice.objects.all().delete()
    settings.CHAT_MODEL_PRICES = {"a-model": (Decimal("1.5"), Decimal("2.5")),
                                  "b-": (Decimal("0"), Decimal("0"))}
    migration.seed_prices(django_apps, None)
    migration.seed_prices(django_apps, None)
    rows = {p.model: (p.input_per_mtok, p.output_per_mtok) for p in ModelPrice.objects.all()}
    assert rows == {"a-model": (Decimal("1.5"), Decimal("2.5")), "b-": (0, 0)}
    assert ModelPrice.objects.count() == 2


# --- budgets in the admin -------------------------------------------------------------------
def test_staff_set_a_budget_in_the_admin_and_see_what_was_used(admin_client, alice):
    make_record(alice, prompt=700, completion=300, cost="0.25")
    assert admin_client.get(reverse("admin:chat_userbudget_add")).status_code == 200
    response = admin_client.post(reverse("admin:chat_userbudget_add"), {
        "user": alice.pk, "tokens_per_day": "5000", "usd_per_day": "",
        "tokens_per_month": "", "usd_per_month": "2.50", "max_concurrent": "2",
    })
    assert response.status_code == 302
    budget = UserBudget.objects.get(user=alice)
    assert (budget.tokens_per_day, budget.usd_per_month, budget.max_concurrent) == (
        5000, Decimal("2.5"), 2)
    assert budget.usd_per_day is None
    page = admin_client.get(reverse("admin:chat_userbudget_change", args=[budget.pk]))
    assert "Today: 1,000 tokens, $0.2500" in page.content.decode()


# --- streaming from the real ASGI server ----------------------------------------------------------
def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


@pytest.mark.multiprocess
@pytest.mark.django_db(transaction=True)
def test_the_asgi_server_streams_a_large_export_in_chunks(admin_user, alice, asgi_server):
    import urllib.request

    from tests.conftest import session_cookie

    rows = int(__import__("os").environ.get("CSV_BENCH_ROWS", "20000"))
    conversation = Conversation.objects.create(owner=alice, title="bulk")
    now = timezone.now()
    UsageRecord.objects.bulk_create(
        (UsageRecord(user=alice, conversation=conversation, model="gpt-4o-mini",
                     status="completed", prompt_tokens=n % 1000, completion_tokens=7,
                     total_tokens=n % 1000 + 7, cost_usd=Decimal("0.00000100"),
                     created_at=now - dt.timedelta(seconds=n)) for n in range(rows)),
        batch_size=5000,
    )
    request = urllib.request.Request(
        asgi_server.url + reverse(EXPORT), headers={"Cookie": session_cookie(admin_user)}
    )
    pid = asgi_server.process.pid
    before = _peak_rss_mb(pid)
    reads, lines, size = 0, 0, 0
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/csv")
        assert response.headers.get("Content-Length") is None  # streamed, not buffered
        while chunk := response.read1(65536):
            reads += 1
            lines += chunk.count(b"\n")
            size += len(chunk)
    after = _peak_rss_mb(pid)
    print(f"CSV export of {rows} rows over ASGI: {size / 1e6:.1f} MB in {reads} reads; "
          f"server peak RSS {before:.0f} -> {after:.0f} MB")
    assert lines == rows + 1
    assert reads > 1


@pytest.mark.django_db(transaction=True)
async def test_under_asgi_the_export_is_an_asynchronous_stream(admin_user, alice, monkeypatch):
    """Django reads a synchronous iterator whole into memory before sending it under
    ASGI; the export must hand it an asynchronous one, fetched chunk by chunk."""
    from django.test import AsyncClient

    conversation = await Conversation.objects.acreate(owner=alice, title="async")
    await UsageRecord.objects.abulk_create(
        UsageRecord(user=alice, conversation=conversation, model="m", status="completed",
                    total_tokens=n) for n in range(20)
    )
    monkeypatch.setattr(usage.csv_chunk, "__defaults__", (6,))
    client = AsyncClient()
    await client.aforce_login(admin_user)
    response = await client.get(reverse(EXPORT))
    assert response.status_code == 200
    assert response.is_async
    chunks = [chunk async for chunk in response.streaming_content]
    assert len(chunks) == 1 + 4  # header, then ceil(20 / 6) chunks
    rows = list(csv.DictReader(io.StringIO(b"".join(chunks).decode())))
    assert sorted(int(r["total_tokens"]) for r in rows) == list(range(20))


def test_negative_prices_and_budgets_are_refused_with_a_form_error(admin_client, alice):
    response = admin_client.post(reverse("admin:chat_modelprice_add"), {
        "model": "m", "input_per_mtok": "-1", "output_per_mtok": "1",
        "valid_from_0": "2026-01-01", "valid_from_1": "00:00:00",
    })
    assert response.status_code == 200 and response.context["adminform"].form.errors
    response = admin_client.post(reverse("admin:chat_userbudget_add"), {
        "user": alice.pk, "usd_per_day": "-5", "max_concurrent": "1",
    })
    assert response.status_code == 200 and response.context["adminform"].form.errors
    assert not ModelPrice.objects.filter(model="m").exists()
    assert not UserBudget.objects.exists()
