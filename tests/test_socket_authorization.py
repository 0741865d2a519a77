"""A socket the server refused can do nothing, and the actions check
the owner where they act, not only at connect: the consumer ignores frames of a socket
not authorized for its conversation, ``request_stop``/``request_snapshot`` and the
control group check the run's owner, the REST stop answers 404 to anyone else.

The live tests speak raw WebSocket over TCP so that the ``stop`` frame leaves right
after the 101 response, before the server's 4401/4403 close reaches the client (which
is what an attacker does; a client library would stop sending once it sees the close).
"""

import asyncio
import base64
import json
import logging
import os
import uuid

import pytest
import websockets
from asgiref.sync import sync_to_async
from django.test import AsyncClient

from chat import generation as gen
from chat.models import ApiToken, Message
from tests.conftest import session_cookie

pytestmark = pytest.mark.django_db(transaction=True)

LONG_ANSWER = " ".join(f"word{i}" for i in range(150))


# --- a raw WebSocket client ------------------------------------------------------------
def masked_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One client frame (RFC 6455 5.2): FIN, ``opcode``, the mask bit and a 4-byte mask
    (clients must mask), the payload length in 7, 7+16 or 7+64 bits."""
    mask = os.urandom(4)
    length = len(payload)
    if length < 126:
        header = bytes([0x80 | opcode, 0x80 | length])
    elif length < 1 << 16:
        header = bytes([0x80 | opcode, 0x80 | 126]) + length.to_bytes(2, "big")
    else:
        header = bytes([0x80 | opcode, 0x80 | 127]) + length.to_bytes(8, "big")
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def read_frame(reader) -> tuple[int, bytes]:
    """One server frame (unmasked): ``(opcode, payload)``."""
    first, second = await reader.readexactly(2)
    length = second & 0x7F
    if length == 126:
        length = int.from_bytes(await reader.readexactly(2), "big")
    elif length == 127:
        length = int.from_bytes(await reader.readexactly(8), "big")
    return first & 0x0F, await reader.readexactly(length)


async def send_right_after_101(server, conversation_id, headers: dict, frames: list[dict]):
    """Upgrade a raw TCP connection, write ``frames`` at once after the 101, and return
    ``(close code, frames received before the close)``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        request = [
            f"GET /ws/conversations/{conversation_id}/ HTTP/1.1",
            f"Host: 127.0.0.1:{server.port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}",
            "Sec-WebSocket-Version: 13",
            *(f"{name}: {value}" for name, value in headers.items()),
        ]
        writer.write(("\r\n".join(request) + "\r\n\r\n").encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101"), head
        writer.write(b"".join(masked_frame(json.dumps(f).encode()) for f in frames))
        await writer.drain()
        received = []
        async with asyncio.timeout(10):
            while True:
                opcode, payload = await read_frame(reader)
                if opcode == 0x8:
                    code = int.from_bytes(payload[:2], "big")
                    writer.write(masked_frame(payload[:2], opcode=0x8))
                    await writer.drain()
                    return code, received
                received.append(json.loads(payload))
    finally:
        writer.close()


# --- refused sockets on a live server ---------------------------------------------------
async def test_stop_written_by_refused_sockets_right_after_101_does_not_cancel_alices_run(
    alice, bob, upstream, asgi_server
):
    upstream.answer = LONG_ANSWER
    cookie = await sync_to_async(session_cookie)(alice)
    conversation = uuid.uuid4()
    tab = await websockets.connect(
        f"{asgi_server.ws_url}/ws/conversations/{conversation}/",
        additional_headers={"Cookie": cookie, "Origin": asgi_server.url},
    )
    assert json.loads(await tab.recv())["type"] == "state"
    await tab.send(json.dumps({"type": "message", "content": "a long answer please"}))
    frames = []
    while len([f for f in frames if f["type"] == "delta"]) < 3:
        frames.append(json.loads(await asyncio.wait_for(tab.recv(), 10)))
    message_id = next(f for f in frames if f["type"] == "generation.start")["message"]["id"]

    bobs_cookie = await sync_to_async(session_cookie)(bob)
    _, bobs_key = await sync_to_async(ApiToken.issue)(bob, "bob's script")
    attempts = {
        "anonymous": ({"Origin": asgi_server.url}, 4401),
        "bob's cookie": ({"Cookie": bobs_cookie, "Origin": asgi_server.url}, 4403),
        "bob's token": ({"Authorization": f"Token {bobs_key}"}, 4403),
    }
    for who, (headers, expected) in attempts.items():
        code, received = await send_right_after_101(
            asgi_server, conversation, headers, [{"type": "stop"}, {"type": "sync"}]
        )
        assert code == expected, who
        assert received == [], f"{who} was answered: {received}"

    while frames[-1]["type"] != "generation.end":
        frames.append(json.loads(await asyncio.wait_for(tab.recv(), 20)))
    assert frames[-1]["status"] == "completed", frames[-1]
    text = "".join(f["content"] for f in frames if f["type"] == "delta")
    assert text == LONG_ANSWER
    saved = await Message.objects.aget(id=message_id)
    assert saved.status == "completed" and saved.content == LONG_ANSWER
    await tab.close()
    # Nothing the refused sockets sent reached a handler, so nothing failed either.
    assert "Traceback" not in asgi_server.log()


# --- the consumer ----------------------------------------------------------------------
async def test_sync_after_a_4403_close_is_ignored_without_a_traceback(
    alice, bob, upstream, connect, caplog
):
    upstream.answer = "Hi."
    conversation = uuid.uuid4()
    _, _, tab = await connect(alice, conversation)
    await tab.receive_type("state")
    await tab.send({"type": "message", "content": "create it"})
    await tab.receive_type("generation.end")

    caplog.set_level(logging.INFO)
    _, _, intruder = await connect(bob, conversation)
    assert await intruder.comm.receive_output(timeout=2) == {
        "type": "websocket.close", "code": 4403
    }
    await intruder.send({"type": "sync"})
    await intruder.send({"type": "stop"})
    # The application handles its input in order: once it has ended, the frames were.
    await intruder.comm.send_input({"type": "websocket.disconnect", "code": 1000})
    await intruder.comm.wait(timeout=5)
    assert await intruder.comm.receive_nothing(timeout=0.1)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert errors == [], [r.getMessage() for r in errors]


async def test_a_socket_on_an_id_someone_else_then_creates_sees_nothing_of_it(
    alice, bob, upstream, connect
):
    upstream.answer = "alice's private answer"
    conversation = uuid.uuid4()
    _, _, bobs = await connect(bob, conversation)  # before the conversation exists
    assert (await bobs.receive_type("state"))["conversation"] is None
    _, _, alices = await connect(alice, conversation)
    await alices.receive_type("state")
    await alices.send({"type": "message", "content": "alice's secret question"})
    await alices.receive_type("generation.end")

    error = await bobs.receive()
    assert error["type"] == "error" and error["code"] == "forbidden"
    assert await bobs.comm.receive_output(timeout=2) == {"type": "websocket.close", "code": 4403}
    assert "secret" not in json.dumps(bobs.frames)
    assert "private" not in json.dumps(bobs.frames)


# --- the generation module --------------------------------------------------------------
async def first_delta(generation):
    queue = generation.subscribe()
    while (await asyncio.wait_for(queue.get(), 10))["type"] != "delta":
        pass


async def test_stop_requested_by_bob_does_not_cancel_alices_run_in_this_process(
    alice, bob, upstream
):
    upstream.answer = LONG_ANSWER[:200]
    generation = await gen.start_generation(alice, uuid.uuid4(), "hi")
    await first_delta(generation)
    assert await gen.request_stop(generation.conversation_id, user_id=bob.id) is False
    assert await gen.request_snapshot(
        generation.conversation_id, "nobody", user_id=bob.id
    ) is None
    end = await asyncio.wait_for(generation.wait(), 20)
    assert end["status"] == "completed"
    assert (await Message.objects.aget(id=generation.message_id)).content == upstream.answer


async def test_stop_and_sync_from_bob_over_the_control_group_are_ignored_by_alices_run(
    alice, bob, upstream
):
    # What another process sends: only the channel layer connects it to the run.
    upstream.answer = LONG_ANSWER[:200]
    generation = await gen.start_generation(alice, uuid.uuid4(), "hi")
    await first_delta(generation)
    layer, control = generation.layer, gen.control_group_name(generation.conversation_id)
    bobs_reply, alices_reply = await layer.new_channel("bob."), await layer.new_channel("a.")
    await layer.group_send(control, {"type": "generation.stop", "user_id": bob.id})
    await layer.group_send(control, {"type": "generation.stop"})  # no requester at all
    await layer.group_send(
        control, {"type": "generation.sync", "reply_channel": bobs_reply, "user_id": bob.id}
    )
    await layer.group_send(
        control, {"type": "generation.sync", "reply_channel": alices_reply, "user_id": alice.id}
    )
    # The run handles control messages in order: alice's answer comes after bob's.
    answer = await asyncio.wait_for(layer.receive(alices_reply), 5)
    assert answer["generation"]["message_id"] == generation.message_id
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(layer.receive(bobs_reply), 0.1)
    assert generation.cancel_reason is None
    end = await asyncio.wait_for(generation.wait(), 20)
    assert end["status"] == "completed"


async def test_rest_stop_by_bob_answers_404_and_alices_run_goes_on(alice, bob, upstream):
    upstream.answer = LONG_ANSWER[:200]
    generation = await gen.start_generation(alice, uuid.uuid4(), "hi")
    await first_delta(generation)
    _, bobs_key = await sync_to_async(ApiToken.issue)(bob, "bob's script")
    response = await AsyncClient().post(
        f"/api/conversations/{generation.conversation_id}/stop",
        content_type="application/json", headers={"Authorization": f"Token {bobs_key}"},
    )
    assert response.status_code == 404
    end = await asyncio.wait_for(generation.wait(), 20)
    assert end["status"] == "completed"
