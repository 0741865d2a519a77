"""A delta lost between the generation and a socket (a socket's inbox over its limit, or
a channel-layer message between processes dropped, as channels-redis does silently when
a channel is over capacity) is repaired from the server: the socket gets a fresh
``state`` frame, never text with a hole."""

from datetime import timedelta

import pytest

from chat.models import Message

pytestmark = pytest.mark.django_db(transaction=True)

ANSWER = " ".join(f"word{i}" for i in range(60))


def text_as_a_client_shows_it(frames, message_id) -> str:
    """Replay frames as the browser does: ``state`` replaces the text, deltas append."""
    text = ""
    for frame in frames:
        if frame["type"] == "state":
            generation = frame["generation"]
            if generation and generation["message_id"] == message_id:
                text = generation["content"]
            else:
                text = next(
                    (m["content"] for m in frame["messages"] if m["id"] == message_id), ""
                )
        elif frame["type"] == "delta" and frame["message_id"] == message_id:
            text += frame["content"]
    return text


async def test_a_socket_that_falls_behind_its_inbox_limit_gets_a_fresh_state_not_a_hole(
    alice, upstream, connect, settings
):
    # Frames reach this process's sockets through their fan-out inbox; one that holds
    # more than CHAT_TUNING.inbox_limit frames throws them away and asks for a fresh
    # state. At a limit of 1, the message and generation.start frames, published
    # together, already overflow it; on the in-memory layer on every configuration,
    # because with a Redis layer the publisher's group_send lets the socket drain its
    # inbox between frames.
    # (A message lost between processes: tests/test_fanout.py.)
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    settings.CHAT_TUNING = settings.CHAT_TUNING.replace(inbox_limit=1)
    upstream.answer = ANSWER
    _, _, ws = await connect(alice)
    await ws.receive_type("state")
    await ws.send({"type": "message", "content": "count for me"})
    end = await ws.receive_type("generation.end", timeout=20)
    assert end["status"] == "completed"
    message_id = end["message_id"]

    states = [f for f in ws.frames if f["type"] == "state"]
    assert len(states) >= 2, "the overflow must trigger a fresh state frame"
    assert text_as_a_client_shows_it(ws.frames, message_id) == ANSWER
    last_seq = 0
    for frame in ws.frames:  # never a delta out of order or twice
        if frame["type"] == "state":
            generation = frame["generation"]
            last_seq = generation["seq"] if generation else last_seq
        elif frame["type"] == "delta":
            assert frame["seq"] == last_seq + 1
            last_seq = frame["seq"]
    saved = await Message.objects.aget(id=message_id)
    assert saved.content == ANSWER


async def test_a_client_sync_frame_gets_a_state_with_the_text_so_far(alice, upstream, connect):
    upstream.answer = ANSWER
    _, _, ws = await connect(alice)
    await ws.receive_type("state")
    await ws.send({"type": "message", "content": "count for me"})
    message_id = (await ws.receive_type("generation.start"))["message"]["id"]
    await ws.receive_until(lambda f: f["type"] == "delta" and f["seq"] >= 2)
    await ws.send({"type": "sync"})
    state = await ws.receive_type("state")
    assert state["generation"]["message_id"] == message_id
    assert ANSWER.startswith(state["generation"]["content"])
    await ws.receive_type("generation.end", timeout=20)
    assert text_as_a_client_shows_it(ws.frames, message_id) == ANSWER


async def test_a_tab_joining_a_run_whose_process_is_silent_shows_the_checkpoint_then_the_end(
    alice, connect
):
    from asgiref.sync import sync_to_async

    from chat.generation import leases
    from tests.test_leases import orphan_run

    # Its process died a moment ago: the lease has not expired, nobody answers snapshots.
    message = await sync_to_async(orphan_run)(alice, heartbeat_age_s=0)
    _, _, ws = await connect(alice, message.conversation_id)
    state = await ws.receive_type("state")
    assert state["generation"] == {
        "message_id": str(message.id), "content": "half an answer", "reasoning": "", "seq": None
    }
    await Message.objects.filter(id=message.id).aupdate(
        heartbeat_at=message.heartbeat_at - timedelta(seconds=60)
    )
    await leases.sweep_once()
    end = await ws.receive_type("generation.end")
    assert end["status"] == "interrupted"
    final = await ws.receive_until(
        lambda f: f["type"] == "state" and f["generation"] is None, timeout=10
    )
    shown = next(m for m in final["messages"] if m["id"] == str(message.id))
    assert shown["status"] == "interrupted" and shown["content"] == "half an answer"
