"""One user cannot hurt the others: a live worker under a frame flood by bob, and a
client that never reads what it asked for (chat.ratelimit, chatproject.server)."""

import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest
import websockets
from asgiref.sync import sync_to_async

from chat.models import Conversation, Message
from tests.conftest import session_cookie
from tests.eventually import eventually_sync
from tests.live import ROOT

pytestmark = pytest.mark.django_db(transaction=True)

MB = 1024 * 1024


def rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid`` (bytes), from /proc."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def test_a_flood_by_bob_neither_locks_alice_out_nor_grows_the_worker(
        asgi_server, alice, bob, upstream):
    upstream.tokens_per_second = 200
    server = asgi_server
    bob_cookie = await sync_to_async(session_cookie)(bob)
    alice_cookie = await sync_to_async(session_cookie)(alice)
    # A first socket so that the worker's start-up allocations are in the baseline.
    async with websockets.connect(f"{server.ws_url}/ws/conversations/{uuid.uuid4()}/",
                                  additional_headers={"Cookie": alice_cookie,
                                                      "Origin": server.url}) as ws:
        assert json.loads(await ws.recv())["type"] == "state"
    rss_before = rss_bytes(server.process.pid)

    flooder = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.flooder", server.ws_url, bob_cookie, "10", "10",
        cwd=ROOT, stdout=subprocess.PIPE)
    await asyncio.sleep(1.0)  # the flood is under way

    opens, first_deltas, errors, sockets = [], [], [], []
    peak_rss = 0
    for _ in range(5):
        started = time.monotonic()
        ws = await websockets.connect(
            f"{server.ws_url}/ws/conversations/{uuid.uuid4()}/",
            additional_headers={"Cookie": alice_cookie, "Origin": server.url},
            open_timeout=10)
        opens.append(time.monotonic() - started)
        sockets.append(ws)
        assert json.loads(await ws.recv())["type"] == "state"
        sent = time.monotonic()
        await ws.send(json.dumps({"type": "message", "content": "Hello"}))
        async with asyncio.timeout(10):
            while True:
                frame = json.loads(await ws.recv())
                if frame["type"] == "error":
                    errors.append(frame)
                    break
                if frame["type"] == "delta":
                    first_deltas.append(time.monotonic() - sent)
                    break
            # Her concurrency limit is one answer: she stops this one, as she reads it.
            await ws.send(json.dumps({"type": "stop"}))
            while json.loads(await ws.recv())["type"] != "generation.end":
                pass
        peak_rss = max(peak_rss, rss_bytes(server.process.pid))
        await asyncio.sleep(max(0.0, 2.0 - (time.monotonic() - started)))

    out, _ = await flooder.communicate()
    report = json.loads(out)
    for ws in sockets:
        await ws.close()

    print("opens", opens, "first deltas", first_deltas, "flood", report,
          "rss", rss_before // MB, peak_rss // MB)
    assert errors == []
    assert max(opens) < 1.0, opens
    assert len(first_deltas) == 5 and max(first_deltas) < 3.0, first_deltas
    assert report["sent"] > 1000, report
    assert report["rate_limited"] >= 1 and report["with_retry_after"] == report["rate_limited"]
    assert report["limited_before_close"], report
    assert report["close_codes"].get("1008", 0) >= 1, report
    assert peak_rss - rss_before < 150 * MB, (rss_before, peak_rss)
    # Every socket was dispatched through the server's own queue (chat.dispatching).
    assert "not chatproject.server's InboundQueue" not in server.log()


def _raw_websocket(server, path: str, cookie: str) -> socket.socket:
    """A WebSocket handshake on a plain socket whose receive buffer is small and never
    read past the handshake: a client that does not read what it is sent."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                  "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                  f"Origin: {server.url}\r\nCookie: {cookie}\r\n\r\n").encode())
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock


def _client_frame(text: str) -> bytes:
    """A masked text frame (RFC 6455 section 5.2) of a short payload."""
    payload = text.encode()
    assert len(payload) < 126
    mask = os.urandom(4)
    return bytes([0x81, 0x80 | len(payload)]) + mask + bytes(
        b ^ mask[i % 4] for i, b in enumerate(payload))


@pytest.fixture
def big_conversation(alice):
    """Alice's conversation of 30 messages of 30,000 characters (about 900 KB)."""
    conversation = Conversation.objects.create(owner=alice, title="Long")
    Message.objects.bulk_create([
        Message(conversation=conversation,
                role=Message.Role.USER if i % 2 == 0 else Message.Role.ASSISTANT,
                content=f"{i} " + "lighthouse keeper " * 1666,
                status=Message.Status.COMPLETED)
        for i in range(30)
    ])
    return conversation


def test_a_client_that_never_reads_cannot_grow_the_worker(asgi_servers, alice,
                                                          big_conversation):
    # No frame rate limit: the bound on what is sent must hold by itself.
    server = asgi_servers(CHAT_FRAME_RATE="0")
    sock = _raw_websocket(server, f"/ws/conversations/{big_conversation.id}/",
                          session_cookie(alice))
    time.sleep(1.0)  # the first state frame is on its way
    rss_before = rss_bytes(server.process.pid)
    sync = _client_frame(json.dumps({"type": "sync"}))
    sock.sendall(sync * 1500)
    # The worker handles the 1,500 frames within a few seconds; its peak is then.
    peak = rss_bytes(server.process.pid)
    for _ in range(15):
        time.sleep(0.3)
        peak = max(peak, rss_bytes(server.process.pid))
    sock.close()
    after = eventually_sync(
        lambda: (value := rss_bytes(server.process.pid)) < rss_before + 50 * MB and value,
        timeout=10)
    print("rss before", rss_before // MB, "peak", peak // MB, "after close", after // MB)
    assert peak - rss_before < 150 * MB, (rss_before, peak)
    assert after, "the memory stayed after the socket closed"
    # The worker still serves: the conversation opens for another tab.
    cookie = session_cookie(alice)

    async def opens():
        async with websockets.connect(
                f"{server.ws_url}/ws/conversations/{big_conversation.id}/",
                additional_headers={"Cookie": cookie, "Origin": server.url},
                max_size=None) as ws:
            return json.loads(await ws.recv())["type"]

    assert asyncio.run(opens()) == "state"


# --- in process: the rules of chat.ratelimit ------------------------------------------------
async def test_a_user_past_the_socket_cap_gets_too_many_sockets_and_1008(alice, bob, connect,
                                                                           settings):
    settings.CHAT_MAX_SOCKETS_PER_USER = 2
    for _ in range(2):
        _, _, ws = await connect(alice)
        assert (await ws.receive())["type"] == "state"
    _, _, third = await connect(alice)
    refused = await third.receive()
    assert refused["type"] == "error" and refused["code"] == "too_many_sockets"
    closed = await third.comm.receive_output(timeout=5)
    assert closed == {"type": "websocket.close", "code": 1008}
    # Bob's own sockets are not counted against alice's cap.
    _, _, bobs = await connect(bob)
    assert (await bobs.receive())["type"] == "state"


async def test_a_stop_is_never_refused_even_past_the_frame_rate(alice, upstream, connect):
    upstream.tokens_per_second = 20
    _, _, ws = await connect(alice)
    await ws.receive_type("state")
    await ws.send({"type": "message", "content": "Tell me about stopping"})
    start = await ws.receive_type("generation.start")
    await ws.receive_type("delta")  # the provider is answering
    # Costly frames empty the socket's bucket (a burst of 30 tokens at 5 each, 10/s).
    for _ in range(12):
        await ws.send({"type": "sync"})
    limited = await ws.receive_until(lambda f: f.get("code") == "rate_limited")
    assert limited["retry_after_ms"] > 0
    await ws.send({"type": "stop"})
    end = await ws.receive_type("generation.end")
    assert end["message_id"] == start["message"]["id"] and end["status"] == "cancelled"
    request = upstream.requests[-1]
    assert await upstream.until(lambda: request.client_closed_at is not None, timeout=2.0)


def test_users_who_left_are_forgotten_once_their_buckets_refill(settings):
    from chat import ratelimit

    settings.CHAT_FRAME_RATE = 1000  # a bucket refills within a few ms
    largest = 0
    for user_id in range(1, 5001):
        limits = ratelimit.open_socket(user_id)
        limits.check("message")  # the bucket is not full when the socket closes
        limits.close()
        largest = max(largest, len(ratelimit._users))
        if user_id % 500 == 0:
            time.sleep(0.02)  # the buckets of the users who left refill
    # 5,000 users came and went; those idle with a full bucket are forgotten.
    assert largest <= 1100, largest
