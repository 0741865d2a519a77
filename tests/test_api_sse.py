"""POST /api/conversations/{id}/messages/ with ``Accept: text/event-stream`` on a live
daphne server, against the real loopback upstream: the deltas arrive as events, and
closing the HTTP connection stops the generation and closes the upstream stream."""

import json
import time

import aiohttp
import pytest
from asgiref.sync import sync_to_async

from chat.models import ApiToken, Conversation, Message, UsageRecord
from tests.eventually import eventually

pytestmark = pytest.mark.django_db(transaction=True)

ANSWER = " ".join(f"word{i}" for i in range(200))


async def read_events(response, until=None):
    """Parse ``event:``/``data:`` blocks from a streaming response; yields
    ``(event, data)`` pairs (comments such as keep-alives are skipped)."""
    buffer = ""
    async for chunk in response.content.iter_any():
        buffer += chunk.decode()
        while "\n\n" in buffer:
            block, buffer = buffer.split("\n\n", 1)
            fields = dict(
                line.split(": ", 1) for line in block.splitlines() if not line.startswith(":")
            )
            if fields:
                yield fields["event"], json.loads(fields["data"])


@pytest.fixture
def token_and_conversation(alice):
    _, key = ApiToken.issue(alice, "sse tests")
    conversation = Conversation.objects.create(owner=alice)
    return key, conversation


def post_stream(session, server, key, conversation, content):
    return session.post(
        f"{server.url}/api/conversations/{conversation.id}/messages/",
        json={"content": content},
        headers={"Authorization": f"Token {key}", "Accept": "text/event-stream"},
    )


async def test_deltas_arrive_as_server_sent_events(asgi_server, upstream, token_and_conversation):
    upstream.answer = ANSWER
    upstream.tokens_per_second = 400
    key, conversation = token_and_conversation
    events = []
    async with aiohttp.ClientSession() as session:
        async with post_stream(session, asgi_server, key, conversation, "Count") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
            async for event, data in read_events(response):
                events.append((event, data))
                if event == "generation.end":
                    break
    kinds = [event for event, _ in events]
    assert kinds[:2] == ["message", "generation.start"]
    assert kinds[-1] == "generation.end"
    assert set(kinds[2:-1]) == {"delta"}
    deltas = [data for event, data in events if event == "delta"]
    assert [d["seq"] for d in deltas] == list(range(1, len(deltas) + 1))
    assert "".join(d["content"] for d in deltas) == ANSWER
    end = events[-1][1]
    assert end["status"] == "completed" and end["usage"]["completion_tokens"] == 200
    message = await Message.objects.aget(id=end["message_id"])
    assert message.status == "completed" and message.content == ANSWER


async def test_closing_the_connection_cancels_and_closes_upstream(
    asgi_server, upstream, token_and_conversation
):
    upstream.answer = ANSWER
    upstream.tokens_per_second = 40
    key, conversation = token_and_conversation
    received = ""
    async with aiohttp.ClientSession() as session:
        response = await post_stream(session, asgi_server, key, conversation, "Count slowly")
        assert response.status == 200
        async for event, data in read_events(response):
            if event == "generation.start":
                message_id = data["message"]["id"]
            if event == "delta":
                received += data["content"]
                if data["seq"] >= 3:
                    break
        # Close the TCP connection mid-stream, as a script killed with Ctrl-C would.
        response.close()
        closed_at = time.monotonic()
    record = upstream.requests[-1]
    assert upstream.wait_for(lambda: record.client_closed_at is not None, timeout=1.0), (
        "upstream still streaming 1 s after the client closed"
    )
    print(f"upstream closed {1000 * (record.client_closed_at - closed_at):.0f} ms after the "
          f"client; {record.chunks_written} of 201 chunks written")
    assert record.chunks_written < 150

    async def saved():
        message = await Message.objects.aget(id=message_id)
        return message if message.status != "streaming" else None

    await eventually(saved)
    message = await Message.objects.aget(id=message_id)
    assert message.status == "cancelled"
    assert message.finish_reason == "cancelled"
    assert message.content.startswith(received)
    usage = await UsageRecord.objects.aget(message_id=message_id)
    assert usage.status == "cancelled" and usage.estimated
    assert usage.completion_tokens > 0 and usage.prompt_tokens > 0


async def test_errors_before_streaming_are_json(asgi_server, upstream, token_and_conversation,
                                                 bob):
    key, conversation = token_and_conversation
    _, bob_key = await sync_to_async(ApiToken.issue)(bob, "bob")
    async with aiohttp.ClientSession() as session:
        async with post_stream(session, asgi_server, bob_key, conversation, "hi") as response:
            assert response.status == 404
            assert response.headers["Content-Type"] == "application/json"
        async with post_stream(session, asgi_server, key, conversation, "") as response:
            assert response.status == 400
            assert "content" in await response.json()
        async with post_stream(session, asgi_server, "nope", conversation, "hi") as response:
            assert response.status == 401


async def test_stop_endpoint_ends_a_running_stream(asgi_server, upstream, token_and_conversation):
    upstream.answer = ANSWER
    upstream.tokens_per_second = 40
    key, conversation = token_and_conversation
    async with aiohttp.ClientSession() as session:
        async with post_stream(session, asgi_server, key, conversation, "Go on") as response:
            kinds = []
            async for event, data in read_events(response):
                kinds.append(event)
                if event == "delta" and data["seq"] == 2:
                    async with session.post(
                        f"{asgi_server.url}/api/conversations/{conversation.id}/stop",
                        headers={"Authorization": f"Token {key}"},
                    ) as stop:
                        assert stop.status == 200
                        assert (await stop.json())["running"] is True
                if event == "generation.end":
                    end = data
                    break
    assert end["status"] == "cancelled"
    assert end["usage"]["estimated"] is True
    record = upstream.requests[-1]
    assert upstream.wait_for(lambda: record.client_closed_at is not None, timeout=1.0)
    assert record.chunks_written < 150
