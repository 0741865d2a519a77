"""The chat page of a conversation too large for one ``state`` frame: it opens with the
latest messages, loads the older ones over REST (the "Load earlier messages" button and
scrolling to the top), and shows a message the frame carried cut whole.

Playwright + Debian chromium on a live daphne worker; the fixtures are
tests/test_browser.py's.
"""

from __future__ import annotations

from playwright.sync_api import expect

from tests.test_browser import (  # noqa: F401 - fixtures used by name
    alice_context,
    allow_orm_beside_playwright,
    asgi_server,
    browser,
    context,
    open_chat,
    pytestmark,
)
from tests.test_frame_size import insert_conversation, text_of


def js_length(text: str) -> int:
    """``text.length`` in the browser: UTF-16 code units."""
    return len(text.encode("utf-16-le")) // 2


def client_contents(page) -> list[str]:
    return page.evaluate("() => chatDebug.messages().map(m => m.content)")


def test_older_messages_load_on_the_button_and_on_scrolling_up_and_a_cut_one_is_shown_whole(
    alice, alice_context  # noqa: F811 - the fixture imported above
):
    contents = [text_of(32_000, seed=i) if i % 3 == 0 else f"{i}:" + "x" * 31_998
                for i in range(50)]
    contents[49] = text_of(900_000, seed=99, alphabet="abcdefghij klmnop\nqrstuvwxyzé€ж😀")
    conversation = insert_conversation(alice, contents)

    page = open_chat(alice_context, conversation.id)
    # The newest message came cut; the page fetches it whole over REST.
    page.wait_for_function("n => chatDebug.messages().some(m => m.content.length === n)",
                           arg=js_length(contents[49]))
    assert client_contents(page) == contents[49:]
    button = page.locator("#load-earlier")
    expect(button).to_be_visible()

    button.click()
    page.wait_for_function("() => chatDebug.messages().length === 50")
    expect(page.locator(".msg")).to_have_count(50)
    assert client_contents(page) == contents
    expect(button).to_be_hidden()

    # A fresh page: scrolling to the top loads the older messages too.
    page.close()
    page = open_chat(alice_context, conversation.id)
    expect(button := page.locator("#load-earlier")).to_be_visible()
    page.wait_for_function("n => chatDebug.messages().some(m => m.content.length === n)",
                           arg=js_length(contents[49]))
    page.locator("#transcript").evaluate("t => { t.scrollTop = 0; }")
    page.wait_for_function("() => chatDebug.messages().length > 1")
    assert client_contents(page) == contents[50 - len(client_contents(page)):]
    assert alice_context.page_errors == []
