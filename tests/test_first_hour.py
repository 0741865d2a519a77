"""The first hour of a new user: the words on the pages match the
README, the scripts say where to go next and make an admin without knowing about
.venv, there is a site icon, amounts read the same everywhere, the admin's user filter
has no stray entry, and the API schema opens readably in a browser."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import select
import signal
import subprocess
import time
import urllib.request
from decimal import Decimal
from pathlib import Path

import pytest
from django.urls import reverse
from django.utils import timezone

from chat.models import Conversation, UsageRecord
from chat.money import format_usd, plain_decimal

from .live import free_port

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parent.parent
CHANGELIST = "admin:chat_usagerecord_changelist"
# What Chromium sends when a person opens a link.
BROWSER_ACCEPT = (
    "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,"
    "image/apng,*/*;q=0.8"
)


def record(user, *, cost="0.001", model="gpt-4o-mini", title="A chat"):
    conversation = Conversation.objects.create(owner=user, title=title, model=model)
    return UsageRecord.objects.create(
        user=user, conversation=conversation, model=model, status="completed",
        prompt_tokens=10, completion_tokens=5, total_tokens=15, cost_usd=Decimal(cost),
        duration_ms=100, created_at=timezone.now(),
    )


def text_of(html: str) -> str:
    """The visible text of a page, roughly: tags dropped, whitespace collapsed."""
    return " ".join(re.sub(r"<[^>]+>", " ", html).split())


# --- one wording ----------------------------------------------------------------------------
def test_the_readme_and_the_pages_both_say_create_an_account(client):
    readme = (ROOT / "README.md").read_text()
    assert "create an account" in readme
    assert "sign up" not in readme.lower()

    login = client.get("/accounts/login/").content.decode()
    assert re.search(r'<a href="/accounts/signup/">Create an account</a>', login)

    signup = client.get("/accounts/signup/").content.decode()
    assert "<title>Create an account · Chat</title>" in signup
    assert "<h1>Create an account</h1>" in signup
    assert re.search(r'<button type="submit"[^>]*>Create account</button>', signup)
    for page in (login, signup):
        assert "sign up" not in text_of(page).lower()


# --- scripts: next steps and manage.py without .venv -------------------------------------------
def script_env(directory: Path) -> dict[str, str]:
    """The scripts on a throwaway SQLite file in ``directory`` and the in-memory layer:
    never the test database, the shared PostgreSQL or Redis, whatever configuration the
    tests run in."""
    return {
        **os.environ,
        "DATABASE_URL": "",
        "SQLITE_PATH": str(directory / "first-hour.sqlite3"),
        "REDIS_URL": "",
        "DEBUG": "1",
        "OPENAI_API_KEY": "",
        "OPENAI_BASE_URL": "",
        "PYTHONUNBUFFERED": "1",
    }


def manage(directory: Path, *args, env=None) -> subprocess.CompletedProcess:
    # Run from another directory: the script must not depend on the current one.
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "manage.sh"), *args],
        cwd=directory, env=env or script_env(directory), capture_output=True, text=True,
        timeout=180,
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """A directory whose SQLite database ``scripts/manage.sh migrate`` has set up (once
    for the module: migrating takes seconds)."""
    directory = tmp_path_factory.mktemp("first-hour")
    migrated = manage(directory, "migrate", "--noinput")
    assert migrated.returncode == 0, migrated.stderr
    return directory


def test_manage_sh_makes_an_admin_without_knowing_about_the_virtualenv(site):
    tmp_path = site
    env = {
        **script_env(tmp_path),
        "DJANGO_SUPERUSER_USERNAME": "root",
        "DJANGO_SUPERUSER_EMAIL": "root@example.com",
        "DJANGO_SUPERUSER_PASSWORD": "a-long-admin-pass-7",
    }
    made = manage(tmp_path, "createsuperuser", "--noinput", env=env)
    assert made.returncode == 0, made.stderr
    shown = manage(
        tmp_path, "shell", "-c",
        "from django.contrib.auth.models import User; "
        "u = User.objects.get(username='root'); print(u.is_staff, u.is_superuser)",
    )
    assert shown.stdout.strip().splitlines()[-1] == "True True"


def read_until(process: subprocess.Popen, pattern: str, timeout: float) -> str:
    """The process's output up to the first match of ``pattern``; fails at ``timeout``
    seconds or when the output ends first."""
    seen = ""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([process.stdout], [], [], left)
        chunk = os.read(process.stdout.fileno(), 65536) if ready else b""
        if not chunk:
            break
        seen += chunk.decode(errors="replace")
        if re.search(pattern, seen):
            return seen
    raise AssertionError(f"no {pattern!r} in the output of run.sh:\n{seen[-3000:]}")


def get(url: str):
    """GET without following redirects: (status, Location header)."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(url, timeout=10) as response:
            return response.status, response.headers.get("Location")
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("Location")


def test_run_sh_prints_the_url_and_next_steps_once_the_server_answers(site):
    port = free_port()
    process = subprocess.Popen(
        ["bash", str(ROOT / "scripts" / "run.sh")],
        env={**script_env(site), "HOST": "127.0.0.1", "PORT": str(port)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,  # runserver's reloader child goes with the group
    )
    try:
        output = read_until(process, r"API docs:.*\n", timeout=120)
        url = f"http://127.0.0.1:{port}"
        steps = output[output.index("Next steps"):]
        assert f"Chat is running at {url}/" in output
        assert "create an account" in steps
        assert "bash scripts/manage.sh createsuperuser" in steps
        assert f"{url}/admin/" in steps and f"{url}/api/docs/" in steps
        # Printed once the port answers, so every address in it works at once.
        assert get(f"{url}/")[0] == 302
        assert get(f"{url}/admin/") == (302, "/admin/login/?next=/admin/")
        assert get(f"{url}/api/docs/")[0] == 200
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
        process.stdout.close()


# --- a site icon ------------------------------------------------------------------------------
def test_favicon_ico_is_answered_with_the_site_icon(client, settings):
    settings.DEBUG = True  # whitenoise serves static files from the finders, as in run.sh
    response = client.get("/favicon.ico")
    assert response.status_code == 302
    assert response["Location"] == "/static/chat/favicon.svg"
    icon = client.get(response["Location"])
    assert icon.status_code == 200
    assert icon["Content-Type"] == "image/svg+xml"
    assert b"".join(icon.streaming_content).startswith(b"<svg")


def test_every_page_links_the_icon(client, alice, admin_client):
    link = '<link rel="icon" href="/static/chat/favicon.svg" type="image/svg+xml">'
    for path in ("/accounts/login/", "/accounts/signup/", reverse("admin:login")):
        assert link in client.get(path).content.decode(), path
    client.force_login(alice)
    for path in (reverse("chat:index"), reverse("chat:tokens")):
        assert link in client.get(path, follow=True).content.decode(), path
    for path in (reverse("admin:index"), reverse(CHANGELIST)):
        assert link in admin_client.get(path).content.decode(), path


# --- one USD format for people, plain decimals for files ------------------------------------------
@pytest.mark.parametrize("amount, shown", [
    ("0", "$0"),
    ("0E-8", "$0"),
    ("0.00000001", "<$0.000001"),
    ("0.0000075", "$0.000008"),
    ("0.000225", "$0.000225"),
    ("0.0075", "$0.0075"),
    ("0.00999999", "$0.0100"),
    ("0.0123456", "$0.0123"),
    ("0.5", "$0.5000"),
    ("1234.56789", "$1,234.5679"),
    ("-0.25", "-$0.2500"),
    (None, "—"),
])
def test_amounts_for_people_follow_one_rule(amount, shown):
    assert format_usd(None if amount is None else Decimal(amount)) == shown


def test_plain_decimals_never_use_an_exponent():
    assert plain_decimal(Decimal("0E-8")) == "0.00000000"
    assert plain_decimal(Decimal("1.5E-7")) == "0.00000015"
    assert plain_decimal(Decimal("0.00022500")) == "0.00022500"


def test_the_csv_writes_a_zero_cost_as_a_plain_decimal(admin_client, alice):
    record(alice, cost="0")
    response = admin_client.get(reverse("admin:chat_usagerecord_export"))
    text = b"".join(response.streaming_content).decode()
    (row,) = csv.DictReader(io.StringIO(text))
    assert row["cost_usd"] == "0.00000000"
    assert row["input_usd_per_mtok"] == "0.000000"
    assert not re.search(r"\dE-?\d", text)


def test_the_api_gives_zero_costs_as_plain_decimals(client, alice):
    rec = record(alice, cost="0")
    client.force_login(alice)
    usage = client.get("/api/usage/").json()
    assert usage["totals"]["cost_usd"] == "0.00000000"
    assert rec.to_dict()["cost_usd"] == "0.00000000"


def test_the_usage_list_totals_and_report_show_amounts_in_the_one_format(admin_client, alice,
                                                                         bob):
    record(alice, cost="0.000225")
    record(alice, cost="0.0075")
    record(bob, cost="0.0000075")
    html = admin_client.get(reverse(CHANGELIST)).content.decode()
    cells = re.findall(r'<td class="field-cost">([^<]*)</td>', html)
    assert sorted(cells) == ["$0.000008", "$0.000225", "$0.0075"]
    assert re.search(r'data-total="cost_usd">\$0\.007733<', html)

    report = admin_client.get(reverse("admin:chat_usagerecord_report")).content.decode()
    assert "45 tokens, $0.007733;" in report
    top_users = report[report.index('id="top-users"'):report.index('id="top-models"')]
    assert '<td class="num">$0.007725</td>' in top_users  # alice
    assert '<td class="num">$0.000008</td>' in top_users  # bob
    daily = report[report.index('id="daily"'):]
    assert '<td class="num">$0.007733</td>' in daily
    assert not re.search(r">\s*0\.\d{5,}\s*<", report)  # no bare 6- or 8-place numbers


def test_conversations_and_records_in_the_admin_use_the_one_format(admin_client, alice):
    rec = record(alice, cost="0.000225", title="Priced")
    conversations = admin_client.get(reverse("admin:chat_conversation_changelist"))
    assert '<td class="field-total_cost">$0.000225</td>' in conversations.content.decode()
    page = admin_client.get(reverse("admin:chat_conversation_change", args=[rec.conversation_id]))
    assert page.status_code == 200
    assert str(rec) == "gpt-4o-mini completed: 15 tokens, $0.000225"


# --- the "By user" filter -------------------------------------------------------------------------
def user_filter_choices(response) -> list[tuple[str, str]]:
    changelist = response.context["cl"]
    (spec,) = [spec for spec in changelist.filter_specs if spec.title == "user"]
    return [(choice["display"], choice["query_string"]) for choice in spec.choices(changelist)]


def test_the_by_user_filter_lists_the_users_with_records_and_nothing_else(admin_client, alice,
                                                                          bob):
    record(alice)
    record(bob)
    response = admin_client.get(reverse(CHANGELIST))
    shown = [display for display, _ in user_filter_choices(response)]
    assert shown == ["All", "alice", "bob"]


def test_records_of_a_deleted_user_are_filtered_as_deleted_user(admin_client, alice, bob):
    record(alice)
    record(bob, cost="0.5")
    record(bob, cost="0.25")
    bob.delete()  # his records stay, their user cleared
    choices = dict(user_filter_choices(admin_client.get(reverse(CHANGELIST))))
    assert list(choices) == ["All", "alice", "(deleted user)"]
    response = admin_client.get(reverse(CHANGELIST) + choices["(deleted user)"])
    assert response.context["cl"].result_count == 2
    assert response.context["usage_totals"]["cost_usd"] == Decimal("0.75")


# --- the API schema in a browser ----------------------------------------------------------------
def test_a_browser_opening_the_schema_is_sent_to_the_api_docs(client):
    response = client.get("/api/schema/", headers={"accept": BROWSER_ACCEPT})
    assert response.status_code == 302
    assert response["Location"] == "/api/docs/"
    docs = client.get("/api/docs/", headers={"accept": BROWSER_ACCEPT})
    assert docs.status_code == 200
    # The docs' start-up script (served as a file: the CSP allows no inline script)
    # loads the JSON schema, so the schema link they show opens inline too.
    script = client.get(docs.data["script_url"], headers={"accept": BROWSER_ACCEPT})
    assert script.status_code == 200
    assert script.data["schema_url"] == "/api/schema/?format=json"


def test_the_json_schema_opens_inline_in_a_browser(client):
    response = client.get("/api/schema/?format=json", headers={"accept": BROWSER_ACCEPT})
    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    assert response["Content-Disposition"].startswith("inline")
    assert json.loads(response.content)["openapi"].startswith("3.")


@pytest.mark.parametrize("accept, content_type", [
    (None, "application/vnd.oai.openapi; charset=utf-8"),
    ("*/*", "application/vnd.oai.openapi; charset=utf-8"),
    ("application/vnd.oai.openapi+json", "application/vnd.oai.openapi+json"),
    ("application/yaml", "application/yaml; charset=utf-8"),
])
def test_tools_still_get_the_schema_they_ask_for(client, accept, content_type):
    response = client.get("/api/schema/", headers={"accept": accept} if accept else {})
    assert response.status_code == 200
    assert response["Content-Type"] == content_type


def test_people_are_pointed_at_the_api_docs(client, alice, admin_user):
    readme = (ROOT / "README.md").read_text()
    api_md = (ROOT / "docs" / "api.md").read_text()
    assert "http://127.0.0.1:8000/api/docs/" in readme and "?format=json" in readme
    assert "/api/schema/?format=json" in api_md
    assert "bash scripts/manage.sh createsuperuser" in readme

    client.force_login(alice)
    page = client.get(reverse("chat:index"), follow=True).content.decode()
    assert '<a href="/api/docs/" id="api-docs-link">API docs</a>' in page
    assert 'id="admin-link"' not in page  # only staff see the admin link
    client.force_login(admin_user)
    page = client.get(reverse("chat:index"), follow=True).content.decode()
    assert '<a href="/admin/" id="admin-link">Admin</a>' in page
