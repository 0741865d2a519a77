"""The pages people use every day, checked in Debian's Chromium: axe-core finds no
serious or critical violation on any of them (login, sign-up, chat in light and dark
and at 390 px, the admin's usage list, record and report), each is screenshotted at
1366 px and 390 px into artifacts/, and the details a person would notice hold (the
usage list fits 1366 px, charts follow the admin's dark theme, the demo notice can be
dismissed, the Edit link hides while its form is open, settings labels line up).

axe-core is vendored (tests/vendor/axe-core, its README says the version and how to
update it) and evaluated in the page through Playwright, so nothing comes from the
network and the page's Content-Security-Policy stays in force.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from decimal import Decimal
from pathlib import Path

import pytest
from django.utils import timezone
from playwright.sync_api import Page, expect

from chat.models import Conversation, Message, UsageRecord
from tests import test_browser
from tests.conftest import session_cookie
from tests.test_browser import ARTIFACTS, CHROMIUM

# The browser tests' fixtures: one Chromium for the module, ORM calls allowed beside it.
allow_orm_beside_playwright = test_browser.allow_orm_beside_playwright
browser = test_browser.browser

AXE = Path(__file__).resolve().parent / "vendor" / "axe-core" / "axe.min.js"
WIDE, NARROW = 1366, 390
# What must be zero: axe-core's two highest impact levels.
BLOCKING = ("serious", "critical")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed"),
]


# --- fixtures ---------------------------------------------------------------------------
@pytest.fixture
def demo_server(asgi_servers):
    """A live server answering with the built-in demo model (the page shows its notice)."""
    return asgi_servers("demo", OPENAI_API_KEY="", OPENAI_BASE_URL="", CHAT_MODEL="",
                        DEMO_TOKENS_PER_SECOND="2000", DJANGO_ALLOW_ASYNC_UNSAFE="")


@pytest.fixture
def carol(django_user_model):
    """Carol reviews usage: a superuser, with a conversation and a month of records."""
    carol = django_user_model.objects.create_superuser("carol", password="carol-password-1")
    conversation = Conversation.objects.create(
        owner=carol, title="A story about a lighthouse keeper", model="demo"
    )
    answer = Message.objects.create(
        conversation=conversation, role="assistant", model="demo",
        content="## About: Write a long story about a lighthouse keeper and the **storm**",
    )
    now = timezone.now()
    for day in range(0, 28, 3):
        for model, cost in (("gpt-4o-mini", "0.0123"), ("gpt-4o", "0.4567")):
            UsageRecord.objects.create(
                user=carol, conversation=conversation, model=model,
                status="cancelled" if day % 2 else "completed",
                prompt_tokens=1200, completion_tokens=34_000, total_tokens=35_200,
                cost_usd=Decimal(cost), ttft_ms=312, duration_ms=48_250,
                created_at=now - dt.timedelta(days=day), source="reported",
                finish_reason="repetition" if day == 3 else "stop", max_tokens=64_000,
            )
    UsageRecord.objects.create(
        user=carol, conversation=conversation, message=answer, model="o3-mini",
        status="completed", prompt_tokens=10, completion_tokens=20, total_tokens=30,
        cost_usd=Decimal("0.000225"), ttft_ms=None, duration_ms=900, source="estimated",
        estimated=True, reasoning_hidden=True,
    )
    return carol


@contextlib.contextmanager
def open_page(browser, server, user=None, path: str = "/", *, width=WIDE, dark=False):
    """A page of a fresh browser profile at ``width`` px, logged in as ``user`` if
    given, opened at ``path`` (the chat page: once it is online); the profile is closed
    on exit."""
    context = browser.new_context(
        base_url=server.url, viewport={"width": width, "height": 860},
        color_scheme="dark" if dark else "light",
    )
    context.set_default_timeout(15_000)
    if user is not None:
        name, value = session_cookie(user).split("=", 1)
        context.add_cookies([{"name": name, "value": value, "url": server.url}])
    try:
        page = context.new_page()
        page.goto(path)
        if path == "/" and user is not None:
            wait_chat_ready(page)
        yield page
    finally:
        context.close()


def ask(page: Page, question: str) -> None:
    """Send ``question`` from the chat page and wait until its answer completed."""
    page.locator("#input").fill(question)
    page.locator("#input").press("Enter")
    expect(page.locator(".msg-assistant").last).to_have_attribute(
        "data-status", "completed", timeout=30_000)


def axe_violations(page: Page) -> list[dict]:
    """axe-core's serious and critical violations on ``page`` as it is now, each as
    {id, impact, help, targets}."""
    if page.evaluate("() => typeof window.axe") == "undefined":
        page.evaluate(AXE.read_text(encoding="utf-8"))
    found = page.evaluate("async () => (await axe.run(document)).violations.map(v => ({"
                          "id: v.id, impact: v.impact, help: v.help,"
                          " targets: v.nodes.map(n => n.target.join(' '))}))")
    return [v for v in found if v["impact"] in BLOCKING]


def check_and_shoot(page: Page, name: str, failures: dict) -> None:
    """Record ``page``'s blocking violations under ``name`` and save its screenshot."""
    violations = axe_violations(page)
    if violations:
        failures[name] = violations
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"a11y-{name}.png"), full_page=True)


def wait_chat_ready(page: Page) -> None:
    expect(page.locator("#connection")).to_have_attribute("data-state", "online")


# --- the audit ----------------------------------------------------------------------------
def test_no_page_has_a_serious_or_critical_axe_violation_at_1366_or_390_px(
    browser, demo_server, carol
):
    failures: dict[str, list] = {}
    record = UsageRecord.objects.filter(reasoning_hidden=True).get()
    pages = {
        "login": (None, "/accounts/login/"),
        "signup": (None, "/accounts/signup/"),
        "chat": (carol, "/"),
        "admin-index": (carol, "/admin/"),
        "admin-usage-list": (carol, "/admin/chat/usagerecord/"),
        "admin-usage-record": (carol, f"/admin/chat/usagerecord/{record.pk}/change/"),
        "admin-usage-report": (carol, "/admin/chat/usagerecord/report/"),
    }
    for width in (WIDE, NARROW):
        for dark in (False, True):
            for name, (user, path) in pages.items():
                if dark and name not in ("chat", "admin-usage-list", "admin-usage-report"):
                    continue
                with open_page(browser, demo_server, user, path, width=width,
                               dark=dark) as page:
                    check_and_shoot(page, f"{name}-{width}{'-dark' if dark else ''}", failures)
    assert not failures, failures


def test_a_chat_with_answers_and_an_open_edit_form_has_no_serious_violation(
    browser, demo_server, carol
):
    with open_page(browser, demo_server, carol) as page:
        ask(page, "Tell me about lighthouses")
        # The README's picture of the page (docs/screenshot-chat.png is copied from it).
        page.screenshot(path=str(ARTIFACTS / "screenshot-chat.png"))
        page.locator("#settings-toggle").click()
        page.locator(".msg-user").last.locator(".action-edit").click()
        failures: dict[str, list] = {}
        check_and_shoot(page, "chat-answer-editing-1366", failures)
        assert not failures, failures


# --- the details ------------------------------------------------------------------------------
def test_the_usage_list_fits_1366_px_without_scrolling_sideways(browser, demo_server, carol):
    with open_page(browser, demo_server, carol, "/admin/chat/usagerecord/") as page:
        widths = page.evaluate(
            "() => { const r = document.querySelector('#changelist .results');"
            " return {page: [document.documentElement.scrollWidth, innerWidth],"
            " list: [r.scrollWidth, r.clientWidth]}; }"
        )
        page.screenshot(path=str(ARTIFACTS / "a11y-admin-usage-list-fit-1366.png"))
        cols = page.evaluate("() => [...document.querySelectorAll('#result_list thead th')]"
                             ".map(th => th.innerText.trim() + ':' + th.offsetWidth)")
        assert widths["page"][0] <= widths["page"][1], widths
        assert widths["list"][0] <= widths["list"][1], (widths, cols)
        headers = page.locator("#result_list thead th").all_inner_texts()
        assert [h.strip().lower() for h in headers[1:]] == [
            "created at", "user, conversation", "model", "status", "cost (usd)", "tokens",
            "time (ms)",
        ], headers


def test_the_report_charts_take_the_admin_fonts_and_follow_its_dark_theme(
    browser, demo_server, carol
):
    with open_page(browser, demo_server, carol, "/admin/chat/usagerecord/report/",
                   dark=True) as page:
        look = page.evaluate(
            "() => { const svg = document.querySelector('#cost-chart svg');"
            " const title = svg.querySelector('.title');"
            " const bg = svg.querySelector('.graph > .background');"
            " return {body: getComputedStyle(document.body).color,"
            " bodyFont: getComputedStyle(document.body).fontFamily,"
            " title: getComputedStyle(title).fill, font: getComputedStyle(title).fontFamily,"
            " background: getComputedStyle(bg).fill,"
            " ticks: [...svg.querySelectorAll('.axis.y .guides text')].map(t => t.textContent)};"
            " }"
        )
        assert look["title"] == look["body"], look
        assert look["font"] == look["bodyFont"] and "monospace" not in look["font"], look
        assert look["background"] in ("transparent", "rgba(0, 0, 0, 0)", "none"), look
        # Round ticks read as money, in the project's format without padding zeros.
        assert any(t.startswith("$") for t in look["ticks"]), look
        assert not any(t.endswith("000") and "." in t for t in look["ticks"]), look
        # The admin's own theme toggle (data-theme) wins over the browser's preference.
        page.evaluate("() => document.documentElement.dataset.theme = 'light'")
        light = page.evaluate(
            "() => [getComputedStyle(document.querySelector('#cost-chart .title')).fill,"
            " getComputedStyle(document.body).color]"
        )
        assert light[0] == light[1] and light[0] != look["title"], light
        page.screenshot(path=str(ARTIFACTS / "a11y-admin-usage-report-toggle-light.png"))


def test_the_demo_notice_scrolls_with_the_transcript_and_stays_dismissed(
    browser, demo_server, carol
):
    with open_page(browser, demo_server, carol, "/", width=NARROW) as page:
        banner = page.locator("#demo-banner")
        expect(banner).to_contain_text("Demo model")
        # Not pinned: it is part of what the transcript scrolls.
        assert page.evaluate(
            "() => document.getElementById('transcript').contains("
            "document.getElementById('demo-banner'))"
        )
        page.get_by_role("button", name="Dismiss the demo model notice").click()
        expect(banner).to_have_count(0)
        page.reload()
        wait_chat_ready(page)
        expect(page.locator("#demo-banner")).to_have_count(0)
    # Another browser profile has not dismissed it.
    with open_page(browser, demo_server, carol, "/") as page:
        expect(page.locator("#demo-banner")).to_be_visible()


def test_the_edit_link_hides_while_its_form_is_open_and_settings_labels_line_up(
    browser, demo_server, carol
):
    with open_page(browser, demo_server, carol, "/") as page:
        ask(page, "A question to edit")
        edit = page.locator(".msg-user").last.locator(".action-edit")
        edit.click()
        expect(page.locator(".edit-form")).to_be_visible()
        expect(edit).to_be_hidden()
        page.locator(".edit-form").get_by_role("button", name="Cancel").click()
        expect(edit).to_be_visible()

        page.locator("#settings-toggle").click()
        model = page.locator("label[for=model]").bounding_box()
        prompt = page.locator("label[for=system-prompt]").bounding_box()
        assert abs(model["y"] - prompt["y"]) < 1, (model, prompt)
