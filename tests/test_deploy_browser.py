"""A rolling deploy seen from a real page: the page reaches the workers through a load
balancer (a small TCP proxy here, trying worker A, then worker B, as nginx's
``proxy_next_upstream error`` does), A is told to stop (SIGTERM) while an answer
streams, the page's socket gets 1012 and reconnects at once, now to B, and the answer
streams on to its end on the page. Debian's Chromium through Playwright, as in
tests/test_browser.py; two live daphne processes on one Redis, as in tests/test_deploy.py.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import uuid

import pytest
from playwright.sync_api import expect

from tests.conftest import session_cookie
from tests.live import free_port
from tests.test_browser import (
    CHROMIUM,
    allow_orm_beside_playwright,  # noqa: F401 - fixture
    answer,
    browser,  # noqa: F401 - fixture
    expect_online,
    new_context,
    raw_answer,
    send,
    wait_streaming_text,
)
from tests.test_multiprocess import REDIS_URL

pytestmark = [
    pytest.mark.browser,
    pytest.mark.multiprocess,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not __import__("pathlib").Path(CHROMIUM).exists(),
                       reason="Debian chromium is not installed"),
]


class Balancer:
    """A TCP proxy on 127.0.0.1:``port``: each connection goes to the first of
    ``targets`` (ports) that accepts it, bytes forwarded both ways until either side
    closes. Runs its own event loop in a thread (the Playwright tests are sync)."""

    def __init__(self, targets: list[int]):
        self.targets = targets
        self.port = free_port()
        self.connections: list[int] = []  # the target port of each connection, in order
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Balancer:
        self._thread.start()
        assert self._ready.wait(10), "the proxy did not start"
        return self

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self.loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self._ready.set()
        await self._stop.wait()
        server.close()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    async def _serve(self, client_reader, client_writer) -> None:
        for port in self.targets:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                continue  # refused: that worker stopped listening, try the next
            self.connections.append(port)
            try:
                await asyncio.gather(self._pipe(client_reader, writer),
                                     self._pipe(reader, client_writer))
            except asyncio.CancelledError:
                pass  # the proxy stops (asyncio's server callback would log a cancel)
            return
        client_writer.close()

    @staticmethod
    async def _pipe(reader, writer) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


@pytest.fixture
def deployment(asgi_servers):
    """Workers A and B (one Redis, a channel prefix of their own, the server's own code
    checked for async-unsafe calls) behind a :class:`Balancer` that prefers A."""
    env = {"REDIS_URL": REDIS_URL, "CHANNEL_PREFIX": f"db{uuid.uuid4().hex[:10]}",
           "LOG_LEVEL": "WARNING", "CHAT_TUNING": json.dumps({"checkpoint_ms": 200}),
           "CHAT_SHUTDOWN_GRACE_S": "30", "DJANGO_ALLOW_ASYNC_UNSAFE": ""}
    a, b = asgi_servers(name="a", **env), asgi_servers(name="b", **env)
    balancer = Balancer([a.port, b.port]).start()
    yield a, b, balancer
    balancer.stop()


# The connection indicator's texts, as the page showed them (a MutationObserver: the
# "Reconnecting…" moment lasts a fraction of a second).
WATCH_CONNECTION = """() => {
  window.connectionTexts = [];
  const el = document.getElementById('connection');
  new MutationObserver(() => window.connectionTexts.push(
      el.dataset.state + ': ' + el.textContent)).observe(
      el, {attributes: true, childList: true, characterData: true, subtree: true});
}"""


def test_a_page_whose_worker_restarts_mid_answer_reconnects_at_once_and_shows_the_whole_answer(
    browser, deployment, alice, upstream  # noqa: F811 - fixture
):
    a, b, balancer = deployment
    upstream.answer = " ".join(f"word{i}" for i in range(80))  # 4 s at 20 words a second
    upstream.tokens_per_second = 20
    context = new_context(browser, balancer, test_hooks=True)
    name, value = session_cookie(alice).split("=", 1)
    context.add_cookies([{"name": name, "value": value, "url": balancer.url}])
    page = context.new_page()
    page.goto("/")
    expect_online(page)
    assert set(balancer.connections) == {a.port}

    send(page, "Count to eighty")
    wait_streaming_text(page, 40)
    page.evaluate(WATCH_CONNECTION)
    a.process.send_signal(signal.SIGTERM)

    page.wait_for_function("() => window.connectionTexts.length > 0")
    expect_online(page)
    # Still the answer A streams, now followed on B through the channel layer.
    expect(answer(page)).to_have_attribute("data-status", "streaming")
    assert b.port in balancer.connections, "the page reconnected to worker B"
    expect(answer(page)).to_have_attribute("data-status", "completed", timeout=30_000)
    texts = page.evaluate("window.connectionTexts")
    assert "offline: Reconnecting…" in texts, texts
    assert not [t for t in texts if "Offline" in t], f"the page backed off: {texts}"

    assert raw_answer(page)["content"] == upstream.answer
    assert answer(page).locator(".msg-body").inner_text().strip() == upstream.answer
    assert page.locator(".msg-assistant").count() == 1
    expect(page.locator("#notice")).to_be_hidden()
    assert context.page_errors == []
    a.process.wait(10)
    assert a.process.returncode == 0
    context.close()
