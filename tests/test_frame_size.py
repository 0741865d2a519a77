"""No frame is larger than the server can send: daphne drops a socket with 1011 when a
WebSocket message passes 1 MiB, so a conversation of large messages, or one large
upstream read, must still open and stream, and its text stays complete over REST.

Live daphne worker (tests/live.py) on the test database, a ``websockets`` client with
alice's session cookie, and a loopback upstream that sends its answer in the pieces a
test asks for (one 1.1 MB read).
"""

import asyncio
import json
import random
import uuid
from datetime import timedelta

import aiohttp
import pytest
import websockets
from asgiref.sync import sync_to_async
from django.utils import timezone

from chat.demo_model import UpstreamServer
from chat.models import Conversation, Message
from tests.conftest import session_cookie

pytestmark = pytest.mark.django_db(transaction=True)

MIB = 1024 * 1024
# Characters of 1 to 4 bytes of UTF-8 and one the JSON encoders escape (6 bytes).
ALPHABET = "abcdefghij klmnop\nqrstuvwxyzé€ж😀\x01"


def text_of(chars: int, seed: int, alphabet: str = ALPHABET) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(alphabet) for _ in range(chars))


class PiecesUpstream(UpstreamServer):
    """The loopback upstream, sending ``pieces`` (when set) as its content chunks, one
    chunk per piece, instead of splitting the answer into words."""

    pieces: list[str] | None = None

    async def _write_tokens(self, record, tokens, chunk, send, finish_reason, messages, usage):
        return await super()._write_tokens(record, self.pieces or tokens, chunk, send,
                                           finish_reason, messages, usage)


@pytest.fixture
def upstream(settings):
    """The conftest upstream (asgi_servers points the worker at it), able to send one
    1.1 MB read."""
    server = PiecesUpstream(tokens_per_second=50).start_in_thread()
    settings.OPENAI_BASE_URL = server.base_url
    settings.OPENAI_API_KEY = "test-key-not-secret"
    settings.OPENAI_MAX_RETRIES = 0
    settings.CHAT_MODEL = "test-model"
    yield server
    server.stop_thread()


class Tab:
    """A ``websockets`` client on the live worker: every frame received, with the byte
    size of its text."""

    def __init__(self, ws):
        self.ws = ws
        self.frames: list[dict] = []
        self.sizes: list[int] = []

    @classmethod
    async def open(cls, server, user, conversation_id) -> "Tab":
        cookie = await sync_to_async(session_cookie)(user)
        ws = await websockets.connect(
            f"{server.ws_url}/ws/conversations/{conversation_id}/",
            additional_headers={"Cookie": cookie, "Origin": server.url}, max_size=None,
        )
        return cls(ws)

    async def receive_until(self, predicate, timeout: float = 30) -> dict:
        """The next frame matching ``predicate``; a close (1011 included) fails."""
        async with asyncio.timeout(timeout):
            while True:
                try:
                    raw = await self.ws.recv()
                except websockets.ConnectionClosed as closed:
                    pytest.fail(f"the socket was closed: {closed.rcvd}")
                frame = json.loads(raw)
                self.frames.append(frame)
                self.sizes.append(len(raw.encode()))
                if predicate(frame):
                    return frame

    async def receive_type(self, kind: str, timeout: float = 30) -> dict:
        return await self.receive_until(lambda f: f["type"] == kind, timeout)

    def last_size(self) -> int:
        return self.sizes[-1]

    def text(self, message_id) -> str:
        deltas = [f for f in self.frames
                  if f["type"] == "delta" and f["message_id"] == message_id]
        assert [f["seq"] for f in deltas] == sorted(f["seq"] for f in deltas)
        return "".join(f["content"] for f in deltas)


def insert_conversation(user, contents: list[str]) -> Conversation:
    """A conversation of ``user`` with these messages (user, assistant, ...), saved
    directly, a second apart."""
    start = timezone.now() - timedelta(hours=1)
    conversation = Conversation.objects.create(owner=user, title="large", created_at=start,
                                               updated_at=start, model="test-model")
    Message.objects.bulk_create(
        Message(conversation=conversation, role="user" if i % 2 == 0 else "assistant",
                content=content, status="completed", model="test-model",
                created_at=start + timedelta(seconds=i),
                completed_at=start + timedelta(seconds=i))
        for i, content in enumerate(contents)
    )
    return conversation


async def rest_get(server, user, path: str) -> tuple[int, dict]:
    """``GET path`` on the live worker with ``user``'s session: (status, JSON body)."""
    cookie = await sync_to_async(session_cookie)(user)
    async with aiohttp.ClientSession(headers={"Cookie": cookie}) as http:
        async with http.get(f"{server.url}{path}") as response:
            return response.status, await response.json()


async def rest_pages(server, user, path: str) -> list[dict]:
    """The results of ``path`` and of every ``next`` page after it."""
    found, url = [], f"{server.url}{path}"
    while url:
        status, body = await rest_get(server, user, url.removeprefix(server.url))
        assert status == 200, body
        found += body["results"]
        url = body["next"]
    return found


async def rest_history(server, user, conversation_id) -> list[dict]:
    """Every message of the conversation over REST, oldest first."""
    return await rest_pages(server, user,
                            f"/api/conversations/{conversation_id}/messages/?page_size=200")


async def rest_before(server, user, conversation_id, message_id) -> list[dict]:
    """The messages before ``message_id`` as the chat page loads them: pages of
    ``?before=``, newest first."""
    return await rest_pages(
        server, user,
        f"/api/conversations/{conversation_id}/messages/?before={message_id}&page_size=7")


async def test_a_conversation_of_50_messages_of_32000_characters_opens_with_its_latest_messages(
    alice, bob, asgi_server
):
    contents = [text_of(32_000, seed=i) if i % 3 == 0 else f"{i}:" + "x" * 31_998
                for i in range(50)]
    conversation = await sync_to_async(insert_conversation)(alice, contents)

    tab = await Tab.open(asgi_server, alice, conversation.id)
    state = await tab.receive_type("state")
    assert tab.last_size() < MIB
    assert state["has_more"] is True
    shown = state["messages"]
    assert 0 < len(shown) < 50
    # The latest messages, in order; whole but for at most the oldest of them.
    assert [m["content"] for m in shown[1:]] == contents[50 - len(shown) + 1:]
    assert contents[50 - len(shown)].startswith(shown[0]["content"])
    # The socket stays usable: a sync gets a fresh state, no 1011.
    await tab.ws.send(json.dumps({"type": "sync"}))
    await tab.receive_type("state")
    assert tab.last_size() < MIB
    await tab.ws.close()

    history = await rest_history(asgi_server, alice, conversation.id)
    assert [m["content"] for m in history] == contents
    older = await rest_before(asgi_server, alice, conversation.id, shown[0]["id"])
    assert [m["content"] for m in reversed(older)] == contents[:50 - len(shown)]

    base = f"/api/conversations/{conversation.id}/messages/"
    assert (await rest_get(asgi_server, bob, f"{base}?before={shown[0]['id']}"))[0] == 404
    assert (await rest_get(asgi_server, bob, f"{base}{shown[0]['id']}/"))[0] == 404


async def test_a_message_larger_than_the_budget_is_sent_cut_and_flagged_and_is_whole_over_rest(
    alice, asgi_server
):
    huge = text_of(900_000, seed=7)  # about 1.2 MB of JSON
    conversation = await sync_to_async(insert_conversation)(alice, ["hello", huge])

    tab = await Tab.open(asgi_server, alice, conversation.id)
    state = await tab.receive_type("state")
    assert tab.last_size() < MIB
    # The newest message takes the whole budget, cut; the question is left for REST.
    [answer] = state["messages"]
    assert state["has_more"] is True and answer["truncated"] is True
    assert 0 < len(answer["content"]) < len(huge) and huge.startswith(answer["content"])
    await tab.ws.close()

    status, whole = await rest_get(
        asgi_server, alice, f"/api/conversations/{conversation.id}/messages/{answer['id']}/")
    assert status == 200 and whole["content"] == huge
    history = await rest_history(asgi_server, alice, conversation.id)
    assert [m["content"] for m in history] == ["hello", huge]


async def test_an_upstream_read_of_1_1_mb_streams_to_an_open_tab_in_deltas_under_the_limit(
    alice, upstream, asgi_server
):
    big = text_of(1_100_000, seed=11, alphabet="abcdefghijklmnopqrstuvwxyz .,\n")
    upstream.pieces = [big]
    conversation_id = uuid.uuid4()
    tab = await Tab.open(asgi_server, alice, conversation_id)
    await tab.receive_type("state")
    await tab.ws.send(json.dumps({"type": "message", "content": "write a lot"}))
    message_id = (await tab.receive_type("generation.start"))["message"]["id"]
    end = await tab.receive_type("generation.end", timeout=60)
    assert end["status"] == "completed"
    assert max(tab.sizes) < MIB
    assert tab.text(message_id) == big
    await tab.ws.close()

    history = await rest_history(asgi_server, alice, conversation_id)
    assert history[-1]["content"] == big


async def test_a_tab_opened_during_a_large_answer_gets_its_end_and_every_later_delta(
    alice, upstream, asgi_server
):
    big = text_of(450_000, seed=5)  # about 600 KB of JSON, twice in a state frame
    tail = [f" word{i}" for i in range(150)]
    upstream.pieces = [big, *tail]  # then 50 pieces a second
    conversation_id = uuid.uuid4()
    first = await Tab.open(asgi_server, alice, conversation_id)
    await first.receive_type("state")
    await first.ws.send(json.dumps({"type": "message", "content": "write a lot"}))
    message_id = (await first.receive_type("generation.start"))["message"]["id"]
    await first.receive_until(lambda f: f["type"] == "delta" and len(first.text(message_id))
                              >= len(big))

    late = await Tab.open(asgi_server, alice, conversation_id)
    state = await late.receive_type("state")
    assert late.last_size() < MIB
    streaming = state["messages"][-1]
    assert streaming["id"] == message_id and streaming["truncated"] is True
    assert state["generation"]["content"] == streaming["content"]
    await late.receive_type("generation.end", timeout=30)
    await first.receive_type("generation.end", timeout=30)
    whole = big + "".join(tail)
    # The end it got, then every later delta once: the end of the answer, no hole.
    assert whole.endswith(streaming["content"] + late.text(message_id))
    assert len(streaming["content"]) > 100_000
    assert first.text(message_id) == whole
    for tab in (first, late):
        await tab.ws.close()
    history = await rest_history(asgi_server, alice, conversation_id)
    assert history[-1]["content"] == whole
