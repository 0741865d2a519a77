"""The chat page in a real browser: Debian's Chromium driven by Playwright, against a
live daphne process on the test database, streaming from the loopback upstream server.

Sync test functions on purpose: Playwright's sync API cannot run inside the event loop
that pytest-asyncio gives async tests. Screenshots go to artifacts/ (git-ignored).
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from chat.models import Conversation, Message
from tests.conftest import session_cookie

CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
PASSWORD = "Correct-horse-battery-9"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed"),
]


# --- fixtures ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def allow_orm_beside_playwright():
    """Playwright's sync API keeps an event loop marked as running in this thread, so
    Django would refuse every ORM call (and the per-test database flush) as "async
    unsafe". The tests' ORM calls are plain sync code; Django documents this switch for
    exactly such environments."""
    old = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    yield
    if old is None:
        os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
    else:
        os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = old


@pytest.fixture(scope="module")
def browser(allow_orm_beside_playwright):
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"],
        )
        yield browser
        browser.close()


@pytest.fixture
def asgi_server(asgi_servers):
    """The live server, without the async-unsafe switch this module sets for itself:
    the server's own code must stay checked."""
    return asgi_servers(DJANGO_ALLOW_ASYNC_UNSAFE="")


def new_context(browser, server, *, test_hooks: bool):
    """A fresh browser profile (cookies, storage) on ``server``; records page errors so
    a test can assert that nothing unexpected ran or broke. ``test_hooks`` asks the
    page for ``window.chatDebug`` (docs/ui.md) by setting ``__CHAT_TEST_HOOKS__``
    before any of the page's scripts run."""
    context = browser.new_context(base_url=server.url, viewport={"width": 1280, "height": 820})
    context.set_default_timeout(15_000)
    context.page_errors = []
    context.on("page", lambda page: page.on(
        "pageerror", lambda err: context.page_errors.append(str(err))
    ))
    if test_hooks:
        context.add_init_script("window.__CHAT_TEST_HOOKS__ = true;")
    return context


@pytest.fixture
def context(browser, asgi_server):
    """A browser profile whose pages offer the test hooks."""
    context = new_context(browser, asgi_server, test_hooks=True)
    yield context
    context.close()


@pytest.fixture
def plain_context(browser, asgi_server):
    """A browser profile as a user has it: no test hooks asked for."""
    context = new_context(browser, asgi_server, test_hooks=False)
    yield context
    context.close()


@pytest.fixture
def alice_context(context, alice, asgi_server):
    """The browser profile, logged in as alice through her session cookie."""
    name, value = session_cookie(alice).split("=", 1)
    context.add_cookies([{"name": name, "value": value, "url": asgi_server.url}])
    return context


# --- helpers ------------------------------------------------------------------------------
def screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


def open_chat(context, conversation_id=None) -> Page:
    page = context.new_page()
    page.goto(f"/c/{conversation_id}/" if conversation_id else "/")
    expect_online(page)
    return page


def expect_online(page: Page, timeout: float = 15_000) -> None:
    expect(page.locator("#connection")).to_have_attribute("data-state", "online", timeout=timeout)


def conversation_id_of(page: Page) -> str:
    return re.search(r"/c/([0-9a-f-]{36})/", page.url).group(1)


def send(page: Page, text: str) -> None:
    page.locator("#input").fill(text)
    page.locator("#input").press("Enter")


def answer(page: Page):
    return page.locator(".msg-assistant").last


def raw_answer(page: Page) -> dict:
    """The client's model of the last assistant message (raw markdown, status)."""
    return page.evaluate(
        "() => chatDebug.messages().filter(m => m.role === 'assistant').pop() || null"
    )


def wait_streaming_text(page: Page, chars: int = 40) -> None:
    """Wait until the streaming answer shows at least ``chars`` characters."""
    expect(answer(page)).to_have_attribute("data-status", "streaming")
    page.wait_for_function(
        "n => { const m = chatDebug.messages().filter(m => m.role === 'assistant').pop();"
        " return m && m.content.length >= n; }",
        arg=chars,
    )


def db_message(message_id) -> Message:
    return Message.objects.get(id=message_id)


# --- the required scenarios -------------------------------------------------------------------
def test_sign_up_send_watch_stream_stop_and_the_partial_answer_survives_a_reload(
    context, upstream
):
    page = context.new_page()
    page.goto("/accounts/signup/")
    page.get_by_label("Username").fill("carol")
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_label("Password confirmation").fill(PASSWORD)
    page.get_by_role("button", name="Create account").click()
    page.wait_for_url(re.compile(r"/c/[0-9a-f-]{36}/$"))
    expect_online(page)

    send(page, "Explain streaming and cancellation")
    question = page.locator(".msg-user .msg-body").last
    expect(question).to_have_text("Explain streaming and cancellation")
    wait_streaming_text(page, 900)
    expect(page.locator("#stop")).to_be_visible()
    expect(page.locator("#send")).to_be_hidden()
    screenshot(page, "chat-mid-stream")

    page.locator("#stop").click()
    expect(answer(page)).to_have_attribute("data-status", "cancelled")
    request = upstream.requests[-1]
    assert upstream.wait_for(lambda: request.client_closed_at is not None, 2)
    assert not request.completed
    expect(answer(page).locator(".badge-cancelled")).to_have_text("Stopped")
    expect(answer(page).locator(".msg-usage")).to_contain_text("tokens")
    expect(answer(page).locator(".msg-usage")).to_contain_text("estimated")
    expect(page.locator("#stop")).to_be_hidden()
    shown = raw_answer(page)
    shown_text = answer(page).locator(".msg-body").inner_text()
    screenshot(page, "chat-after-stop")

    saved = db_message(shown["id"])
    assert saved.status == "cancelled"
    assert saved.content == shown["content"]
    assert 0 < len(saved.content) < len("".join(request.text_written)) + 1

    page.reload()
    expect_online(page)
    expect(answer(page)).to_have_attribute("data-status", "cancelled")
    assert raw_answer(page)["content"] == shown["content"]
    assert answer(page).locator(".msg-body").inner_text() == shown_text
    expect(page.locator(".conversation-link.active")).to_have_text(
        "Explain streaming and cancellation"
    )
    assert context.page_errors == []


def test_two_pages_both_show_the_stream_and_stop_in_the_second_stops_it(
    alice_context, upstream
):
    first = open_chat(alice_context)
    second = open_chat(alice_context, conversation_id_of(first))

    send(first, "Tell me about websockets")
    wait_streaming_text(first, 60)
    wait_streaming_text(second, 60)
    expect(second.locator(".msg-user .msg-body")).to_have_text("Tell me about websockets")
    expect(second.locator("#stop")).to_be_visible()

    second.locator("#stop").click()
    request = upstream.requests[-1]
    assert upstream.wait_for(lambda: request.client_closed_at is not None, 2)
    for page in (first, second):
        expect(answer(page)).to_have_attribute("data-status", "cancelled")
        expect(answer(page).locator(".badge-cancelled")).to_be_visible()
    assert raw_answer(first)["content"] == raw_answer(second)["content"]
    assert db_message(raw_answer(first)["id"]).content == raw_answer(second)["content"]


XSS_ANSWER = (
    "# Heading one\n\n"
    "Some **bold** text and `inline code`.\n\n"
    "- first item\n- second item\n\n"
    "| name | value |\n|---|---|\n| a | 1 |\n| b | 2 |\n\n"
    "```python\ndef greet(name):\n    return f'hello {name}'\n```\n\n"
    '<img src=x onerror="window.__xss = (window.__xss || 0) + 1">\n\n'
    "<script>window.__xss = (window.__xss || 0) + 10</script>\n\n"
    "[click me](javascript:window.__xss=100) and <a href=\"javascript:window.__xss=1000\">"
    "raw link</a>\n"
)


def test_markdown_renders_and_html_in_answers_or_messages_runs_nothing(
    alice_context, upstream
):
    upstream.answer = XSS_ANSWER
    upstream.tokens_per_second = 400
    alice_context.grant_permissions(["clipboard-read", "clipboard-write"])
    page = open_chat(alice_context)
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))

    send(page, '<img src=x onerror="window.__xss=5"> is my <b>question</b>')
    expect(answer(page)).to_have_attribute("data-status", "completed")
    body = answer(page).locator(".msg-body")
    expect(body.locator("h1")).to_have_text("Heading one")
    expect(body.locator("strong")).to_have_text("bold")
    expect(body.locator("ul > li")).to_have_count(2)
    expect(body.locator("table td")).to_have_count(4)
    code = body.locator("pre code.hljs")
    expect(code).to_contain_text("def greet(name):")
    assert code.locator("span.hljs-keyword").count() >= 1, "code is not highlighted"

    # The HTML is shown as text; no element, handler or javascript: link exists.
    expect(body).to_contain_text('<img src=x onerror="window.__xss')
    expect(body).to_contain_text("<script>window.__xss")
    assert page.locator("#transcript img, #transcript script").count() == 0
    assert page.locator("#transcript [onerror]").count() == 0
    assert page.locator('#transcript a[href^="javascript"]').count() == 0
    expect(page.locator(".msg-user .msg-body")).to_have_text(
        '<img src=x onerror="window.__xss=5"> is my <b>question</b>'
    )
    body.get_by_text("click me").click()
    page.wait_for_timeout(300)
    assert page.evaluate("() => window.__xss") is None
    assert dialogs == []

    copy = body.locator(".copy-btn")
    copy.click()
    expect(copy).to_have_text("Copied")
    assert "def greet(name):" in page.evaluate("() => navigator.clipboard.readText()")
    # Reloading renders the saved answer the same way.
    page.reload()
    expect_online(page)
    expect(answer(page).locator(".msg-body h1")).to_have_text("Heading one")
    assert page.locator("#transcript img, #transcript script").count() == 0
    assert page.evaluate("() => window.__xss") is None
    assert alice_context.page_errors == []


def test_a_second_page_whose_socket_drops_mid_stream_reconnects_and_shows_the_answer_once(
    alice_context, upstream
):
    upstream.tokens_per_second = 40
    first = open_chat(alice_context)
    second = open_chat(alice_context, conversation_id_of(first))

    send(first, "Describe reconnection with backoff")
    wait_streaming_text(second, 80)
    second.evaluate("() => chatDebug.dropSocket()")
    expect(second.locator("#connection")).to_have_attribute("data-state", "offline")
    expect(second.locator("#connection")).to_contain_text("Offline")
    expect_online(second)
    # The run belongs to the first page: it goes on, and the second page follows it.
    expect(answer(second)).to_have_attribute("data-status", "streaming")

    expect(answer(first)).to_have_attribute("data-status", "completed", timeout=30_000)
    expect(answer(second)).to_have_attribute("data-status", "completed", timeout=10_000)
    request = upstream.requests[-1]
    assert request.completed
    full = "".join(request.text_written)
    saved = db_message(raw_answer(second)["id"])
    assert saved.content == full
    assert raw_answer(second)["content"] == full
    assert raw_answer(first)["content"] == full
    assert (
        answer(second).locator(".msg-body").inner_text()
        == answer(first).locator(".msg-body").inner_text()
    )
    assert second.locator(".msg-assistant").count() == 1
    assert second.locator(".msg-user").count() == 1


def test_dropping_the_socket_of_the_page_that_started_the_run_stops_it_and_shows_it_stopped(
    alice_context, upstream
):
    page = open_chat(alice_context)
    send(page, "Describe what happens on disconnect")
    wait_streaming_text(page, 60)
    page.evaluate("() => chatDebug.dropSocket()")
    request = upstream.requests[-1]
    assert upstream.wait_for(lambda: request.client_closed_at is not None, 3)
    assert not request.completed

    expect_online(page)
    expect(answer(page)).to_have_attribute("data-status", "cancelled")
    expect(answer(page).locator(".badge-cancelled")).to_have_text("Stopped")
    expect(answer(page).locator(".msg-usage")).to_contain_text("estimated")
    saved = db_message(raw_answer(page)["id"])
    assert saved.status == "cancelled"
    assert raw_answer(page)["content"] == saved.content
    assert 0 < len(saved.content)
    assert page.locator(".msg-assistant").count() == 1


# --- keyboard, scrolling, offline, errors, layout -----------------------------------------------
def test_escape_stops_the_answer_and_shift_enter_adds_a_line_instead_of_sending(
    alice_context, upstream
):
    page = open_chat(alice_context)
    box = page.locator("#input")
    box.fill("first line")
    box.press("Shift+Enter")
    box.press_sequentially("second line")
    assert box.input_value() == "first line\nsecond line"
    assert page.locator(".msg-user").count() == 0

    box.press("Enter")
    expect(page.locator(".msg-user .msg-body")).to_have_text("first line\nsecond line")
    assert box.input_value() == ""
    wait_streaming_text(page, 30)
    page.keyboard.press("Escape")
    expect(answer(page)).to_have_attribute("data-status", "cancelled")
    request = upstream.requests[-1]
    assert upstream.wait_for(lambda: request.client_closed_at is not None, 2)


def test_a_reader_scrolled_up_is_not_pulled_down_by_the_stream(alice_context, upstream):
    upstream.tokens_per_second = 60
    page = open_chat(alice_context)
    page.set_viewport_size({"width": 900, "height": 520})
    send(page, "Write a long answer about scrolling")
    wait_streaming_text(page, 30)
    transcript = page.locator("#transcript")
    # Enough text that the view scrolls, then the reader goes back to the top.
    page.wait_for_function(
        "() => { const t = document.getElementById('transcript');"
        " return t.scrollHeight > t.clientHeight + 200; }"
    )
    transcript.evaluate("t => t.scrollTo({top: 0})")
    transcript.dispatch_event("scroll")
    before = transcript.evaluate("t => [t.scrollTop, t.scrollHeight]")
    page.wait_for_function(
        "h => document.getElementById('transcript').scrollHeight > h + 100", arg=before[1]
    )
    assert transcript.evaluate("t => t.scrollTop") == 0
    expect(page.locator("#jump")).to_be_visible()
    page.locator("#jump").click()
    assert transcript.evaluate("t => t.scrollHeight - t.scrollTop - t.clientHeight") < 60
    page.keyboard.press("Escape")
    expect(answer(page)).to_have_attribute("data-status", "cancelled")


def test_a_message_typed_while_offline_is_sent_after_the_reconnect(alice_context, upstream):
    upstream.tokens_per_second = 400
    page = open_chat(alice_context)
    # The network goes away (Chromium's offline emulation also refuses new WebSockets)
    # and the socket with it.
    alice_context.set_offline(True)
    page.evaluate("() => chatDebug.dropSocket()")
    expect(page.locator("#connection")).to_have_attribute("data-state", "offline")

    send(page, "Sent while offline")
    queued = page.locator(".msg-user.pending")
    expect(queued).to_have_count(1)
    expect(queued.locator(".msg-status")).to_contain_text("Offline")
    page.wait_for_timeout(1500)  # reconnect attempts fail meanwhile
    expect(page.locator("#connection")).to_have_attribute("data-state", "offline")
    assert not Message.objects.filter(content="Sent while offline").exists()
    alice_context.set_offline(False)

    expect_online(page)
    expect(page.locator(".msg-user.pending")).to_have_count(0)
    expect(page.locator(".msg-user .msg-body")).to_have_text("Sent while offline")
    expect(answer(page)).to_have_attribute("data-status", "completed")
    assert Message.objects.filter(role="user", content="Sent while offline").count() == 1


def test_an_upstream_failure_is_shown_on_the_answer_and_in_a_notice(alice_context, upstream):
    upstream.drop_after = 8
    page = open_chat(alice_context)
    send(page, "This one will break")
    expect(answer(page)).to_have_attribute("data-status", "failed")
    expect(answer(page).locator(".badge-failed")).to_have_text("Failed")
    expect(answer(page).locator(".status-detail")).to_contain_text("connection")
    expect(page.locator("#notice")).to_be_visible()
    expect(page.locator("#notice")).to_contain_text("The model failed")
    assert len(raw_answer(page)["content"]) > 0


def test_a_busy_conversation_gives_a_clear_message_and_keeps_the_text(alice_context, upstream):
    page = open_chat(alice_context)
    send(page, "Start a long answer")
    wait_streaming_text(page, 20)
    # A second tab that has not seen the run yet (or a race) gets `busy` back.
    page.evaluate(
        "() => { chatDebug.setPending('Another question');"
        " chatDebug.send({type: 'message', content: 'Another question'}); }"
    )
    expect(page.locator("#notice")).to_contain_text("already being written")
    assert page.locator("#input").input_value() == "Another question"
    page.keyboard.press("Escape")
    expect(answer(page)).to_have_attribute("data-status", "cancelled")


def test_regenerate_replaces_the_answer_and_edit_resends_the_last_message(
    alice_context, upstream
):
    upstream.tokens_per_second = 400
    page = open_chat(alice_context)
    other = open_chat(alice_context, conversation_id_of(page))
    send(page, "Original question")
    expect(answer(page)).to_have_attribute("data-status", "completed")
    first_id = raw_answer(page)["id"]

    answer(page).locator(".action-regenerate").click()
    page.wait_for_function(
        "id => chatDebug.messages().some(m => m.role === 'assistant' && m.id !== id)",
        arg=first_id,
    )
    expect(answer(page)).to_have_attribute("data-status", "completed")
    assert page.locator(".msg-assistant").count() == 1
    assert raw_answer(page)["id"] != first_id

    page.locator(".msg-user").last.locator(".action-edit").click()
    page.locator(".edit-form textarea").fill("Edited question")
    page.locator(".edit-form textarea").press("Enter")
    expect(page.locator(".msg-user .msg-body")).to_have_text(["Edited question"])
    expect(answer(page)).to_have_attribute("data-status", "completed")
    assert page.locator(".msg-assistant").count() == 1
    # The other tab stays in step: it shows what the user sees, not the superseded rows.
    expect(other.locator(".msg-user .msg-body")).to_have_text(["Edited question"])
    expect(other.locator(".msg-assistant")).to_have_count(1)
    expect(answer(other)).to_have_attribute("data-status", "completed")
    visible = Message.objects.filter(conversation_id=conversation_id_of(page)).visible()
    assert [m.content for m in visible if m.role == "user"] == ["Edited question"]


def test_a_lost_delta_is_never_papered_over_the_page_resyncs_from_the_state_frame(
    alice_context, upstream
):
    upstream.tokens_per_second = 40
    page = open_chat(alice_context)
    send(page, "Count the deltas")
    wait_streaming_text(page, 40)
    before = page.evaluate("() => chatDebug.stateFrames()")
    page.evaluate("() => chatDebug.loseDeltas(1)")
    # The next delta after the lost one shows a gap in seq: the page asks for a state.
    page.wait_for_function("n => chatDebug.stateFrames() > n", arg=before)
    expect(answer(page)).to_have_attribute("data-status", "completed", timeout=30_000)
    request = upstream.requests[-1]
    assert raw_answer(page)["content"] == "".join(request.text_written)
    assert db_message(raw_answer(page)["id"]).content == raw_answer(page)["content"]


def test_quota_exceeded_says_what_is_left_and_when_it_resets_and_keeps_the_text(
    alice_context, upstream
):
    page = open_chat(alice_context)
    page.evaluate(
        "() => { chatDebug.setPending('Over budget question');"
        " chatDebug.inject({type: 'error', code: 'quota_exceeded',"
        " detail: 'Daily token budget exceeded.', remaining_tokens: 120,"
        " resets_at: '2030-01-02T00:00:00+00:00'}); }"
    )
    notice = page.locator("#notice")
    expect(notice).to_contain_text("Daily token budget exceeded.")
    expect(notice).to_contain_text("remaining tokens: 120")
    expect(notice).to_contain_text("resets at: ")
    expect(notice).to_contain_text("2030")
    assert page.locator("#input").input_value() == "Over budget question"


def test_an_overloaded_refusal_is_sent_again_by_itself_after_the_hint_and_answered(
    alice_context, upstream
):
    """A message refused as ``overloaded`` is not put back in the box: the page says it
    waits for a free slot and sends it again after retry_after_ms (plus jitter); the
    server, free again, answers it."""
    upstream.answer = "Answered after the retry."
    page = open_chat(alice_context)
    page.evaluate(
        "() => { chatDebug.setPending('A question for a busy server');"
        " chatDebug.inject({type: 'error', code: 'overloaded', reason: 'starts',"
        " detail: 'The server is busy.', retry_after_ms: 600}); }"
    )
    expect(page.locator("#notice")).to_contain_text("waiting for a free slot")
    assert page.locator("#input").input_value() == ""
    expect(answer(page)).to_have_attribute("data-status", "completed", timeout=20_000)
    expect(answer(page)).to_contain_text("Answered after the retry.")
    assert Message.objects.filter(role="user", content="A question for a busy server").count() == 1
    assert alice_context.page_errors == []


def test_the_model_and_system_prompt_chosen_before_the_first_message_are_used(
    asgi_servers, browser, alice, upstream
):
    server = asgi_servers("models", CHAT_MODELS="test-model,other-model",
                          DJANGO_ALLOW_ASYNC_UNSAFE="")
    context = browser.new_context(base_url=server.url)
    try:
        name, value = session_cookie(alice).split("=", 1)
        context.add_cookies([{"name": name, "value": value, "url": server.url}])
        upstream.tokens_per_second = 400
        page = open_chat(context)
        page.locator("#settings-toggle").click()
        expect(page.locator("#model option")).to_have_text(["test-model", "other-model"])
        page.locator("#model").select_option("other-model")
        page.locator("#system-prompt").fill("Answer like a pirate.")
        send(page, "Hello there")
        expect(answer(page)).to_have_attribute("data-status", "completed")
        body = upstream.requests[-1].body
        assert body["model"] == "other-model"
        assert body["messages"][0] == {"role": "system", "content": "Answer like a pirate."}
        from chat.models import Conversation

        conversation = Conversation.objects.get(id=conversation_id_of(page))
        assert (conversation.model, conversation.system_prompt) == (
            "other-model", "Answer like a pirate."
        )
        page.reload()
        expect_online(page)
        expect(page.locator("#model")).to_have_value("other-model")
        expect(page.locator("#system-prompt")).to_have_value("Answer like a pirate.")
        expect(answer(page).locator(".msg-role")).to_have_text("other-model")
    finally:
        context.close()


def test_an_answer_the_server_stopped_for_looping_says_why_under_it(
    alice_context, alice, upstream
):
    # The conversation's own setting turns the repetition guard on (chat.generation.autostop).
    conversation = Conversation.objects.create(owner=alice, repetition_guard=True)
    upstream.answer = "It depends on what you mean by that, so let me say it again. " * 40
    page = open_chat(alice_context, conversation.id)
    send(page, "Why?")
    expect(answer(page)).to_have_attribute("data-status", "cancelled")
    notice = answer(page).locator(".msg-notice")
    expect(notice).to_have_text("Stopped: the answer was repeating itself")
    expect(answer(page).locator(".badge-cancelled")).to_have_text("Stopped")
    assert upstream.wait_for(lambda: upstream.requests[-1].client_closed_at is not None, 2)
    screenshot(page, "chat-autostop")
    page.reload()
    expect_online(page)
    expect(answer(page).locator(".msg-notice")).to_have_text(
        "Stopped: the answer was repeating itself"
    )
    assert not alice_context.page_errors


def test_log_out_is_a_post_and_leads_to_the_log_in_page(alice_context, upstream):
    page = open_chat(alice_context)
    page.locator("#logout").click()
    page.wait_for_url(re.compile(r"/accounts/login/"))
    page.goto("/")
    page.wait_for_url(re.compile(r"/accounts/login/"))
    expect(page.get_by_role("heading", name="Log in")).to_be_visible()


def test_narrow_screen_hides_the_sidebar_in_a_drawer_and_keeps_the_composer_usable(
    alice_context, upstream
):
    upstream.tokens_per_second = 400
    page = alice_context.new_page()
    page.set_viewport_size({"width": 375, "height": 740})
    page.goto("/")
    expect_online(page)
    expect(page.locator("#sidebar")).not_to_be_in_viewport()
    expect(page.locator("#input")).to_be_in_viewport()
    send(page, "Hello from a phone")
    expect(answer(page)).to_have_attribute("data-status", "completed")
    no_sideways_scroll = page.evaluate(
        "() => document.documentElement.scrollWidth <= window.innerWidth"
    )
    assert no_sideways_scroll
    page.locator("#sidebar-open").click()
    expect(page.locator("#sidebar")).to_be_in_viewport()
    expect(page.locator(".conversation-link.active")).to_have_text("Hello from a phone")
    page.wait_for_timeout(300)  # the drawer's slide-in
    screenshot(page, "chat-narrow")
    page.keyboard.press("Escape")
    expect(page.locator("#sidebar")).not_to_be_in_viewport()


def test_the_page_links_the_token_page_and_keeps_the_streaming_answer_aria_busy(
    alice_context, upstream
):
    page = open_chat(alice_context)
    expect(page.locator("#tokens-link")).to_have_attribute("href", "/settings/tokens/")
    expect(page.locator("#model option")).to_have_count(1)
    expect(page.locator("#transcript")).to_have_attribute("aria-live", "polite")
    # The test server uses an API key, so no demo banner here.
    expect(page.locator("#demo-banner")).to_have_count(0)
    send(page, "Is the answer announced politely?")
    # While streaming, the answer is aria-busy so screen readers read it once, whole.
    expect(answer(page)).to_have_attribute("aria-busy", "true")
    page.keyboard.press("Escape")
    expect(answer(page)).to_have_attribute("aria-busy", "false")


def test_without_an_api_key_the_page_says_the_demo_model_answers(
    asgi_servers, browser, alice, upstream
):
    server = asgi_servers("demo", OPENAI_API_KEY="", OPENAI_BASE_URL="", CHAT_MODEL="",
                          DEMO_TOKENS_PER_SECOND="400", DJANGO_ALLOW_ASYNC_UNSAFE="")
    context = browser.new_context(base_url=server.url)
    try:
        name, value = session_cookie(alice).split("=", 1)
        context.add_cookies([{"name": name, "value": value, "url": server.url}])
        page = open_chat(context)
        expect(page.locator("#demo-banner")).to_contain_text("Demo model")
        send(page, "What does the demo model say about kittens?")
        expect(answer(page)).to_have_attribute("data-status", "completed", timeout=30_000)
        expect(answer(page).locator(".msg-body h2")).to_contain_text("kittens")
        expect(answer(page).locator(".msg-usage")).to_contain_text("tokens")
    finally:
        context.close()


def test_a_plain_page_has_no_test_hooks_and_never_downloads_them(
    plain_context, alice, asgi_server, upstream
):
    name, value = session_cookie(alice).split("=", 1)
    plain_context.add_cookies([{"name": name, "value": value, "url": asgi_server.url}])
    page = plain_context.new_page()
    scripts = []
    page.on("request", lambda request: scripts.append(request.url)
            if request.resource_type == "script" else None)
    page.goto("/")
    expect_online(page)
    assert page.evaluate("() => typeof window.chatDebug") == "undefined"
    assert any(url.endswith("/static/chat/main.js") for url in scripts), scripts
    assert not any("test-hooks" in url for url in scripts), scripts
    # The page works without them.
    upstream.tokens_per_second = 400
    send(page, "Hello without hooks")
    expect(answer(page)).to_have_attribute("data-status", "completed")
    assert plain_context.page_errors == []


def test_another_users_conversation_is_not_found(alice_context, bob, upstream):
    from chat.models import Conversation

    theirs = Conversation.objects.create(owner=bob, title="Bob's secret")
    page = alice_context.new_page()
    response = page.goto(f"/c/{theirs.id}/")
    assert response.status == 404
    page.goto(f"/c/{uuid.uuid4()}/")
    expect_online(page)
    expect(page.locator("#conversation-list")).not_to_contain_text("Bob's secret")


# --- conversation management through the REST API ---------------------------------------
def make_conversation(owner, title, text):
    from chat.models import Conversation

    conversation = Conversation.objects.create(owner=owner, title=title, model="test-model")
    Message.objects.create(conversation=conversation, role="user", content=text)
    Message.objects.create(
        conversation=conversation, role="assistant", content=f"About {text}", status="completed"
    )
    return conversation


def test_rename_changes_the_title_in_the_header_the_sidebar_and_the_database(
    alice_context, alice, upstream
):
    conversation = make_conversation(alice, "Old title", "first question")
    page = open_chat(alice_context, conversation.id)
    other_tab = open_chat(alice_context, conversation.id)
    expect(page.locator("#conversation-title")).to_have_text("Old title")
    page.locator("#rename").click()
    page.locator("#rename-input").fill("Trip to Lisbon")
    page.locator("#rename-input").press("Enter")
    expect(page.locator("#conversation-title")).to_have_text("Trip to Lisbon")
    expect(page.locator(".conversation-link.active")).to_have_text("Trip to Lisbon")
    # The other open tab follows without a reload.
    expect(other_tab.locator("#conversation-title")).to_have_text("Trip to Lisbon")
    expect(other_tab.locator(".conversation-link.active")).to_have_text("Trip to Lisbon")
    conversation.refresh_from_db()
    assert conversation.title == "Trip to Lisbon"


def test_delete_asks_for_confirmation_then_removes_the_conversation(
    alice_context, alice, upstream
):
    from chat.models import Conversation

    conversation = make_conversation(alice, "Doomed", "delete me")
    page = open_chat(alice_context, conversation.id)
    other_tab = open_chat(alice_context, conversation.id)
    page.locator("#delete").click()
    expect(page.locator("#delete-dialog")).to_be_visible()
    page.locator("#delete-cancel").click()
    expect(page.locator("#delete-dialog")).to_be_hidden()
    assert Conversation.objects.filter(id=conversation.id).exists()

    page.locator("#delete").click()
    page.locator("#delete-confirm").click()
    page.wait_for_url(lambda url: str(conversation.id) not in url)
    expect_online(page)
    expect(page.locator("#conversation-list")).not_to_contain_text("Doomed")
    assert not Conversation.objects.filter(id=conversation.id).exists()
    # The other tab leaves the deleted conversation for a new chat.
    other_tab.wait_for_url(lambda url: str(conversation.id) not in url)


def test_sidebar_search_finds_conversations_by_message_text(
    alice_context, alice, upstream
):
    make_conversation(alice, "Cooking", "how long to boil an artichoke")
    make_conversation(alice, "Travel", "trains from Porto")
    page = open_chat(alice_context)
    expect(page.locator(".conversation-link")).to_have_count(2)
    page.locator("#search").fill("artichoke")
    expect(page.locator(".conversation-link")).to_have_text(["Cooking"])
    page.locator("#search").fill("")
    expect(page.locator(".conversation-link")).to_have_count(2)


def test_settings_of_an_existing_conversation_are_saved_through_the_api(
    alice_context, alice, upstream
):
    conversation = make_conversation(alice, "Tuned", "a question")
    page = open_chat(alice_context, conversation.id)
    page.locator("#settings-toggle").click()
    page.locator("#system-prompt").fill("Be brief.")
    page.locator("#settings-save").click()
    expect(page.locator("#settings-note")).to_have_text("Saved.")
    conversation.refresh_from_db()
    assert conversation.system_prompt == "Be brief."
