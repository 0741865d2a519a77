"""Deltas are coalesced by time (CHAT_TUNING.delta_coalesce_ms) and by size
(CHAT_TUNING.delta_max_chars): a fast provider's text goes out as soon as enough of it is
pending, without waiting for the window."""

import uuid

import pytest

pytestmark = pytest.mark.django_db(transaction=True)

ANSWER = " ".join(f"word{i}" for i in range(60))


async def test_enough_pending_text_is_sent_at_once_without_waiting_for_the_window(
    alice, upstream, connect, settings
):
    # The window alone would hold every delta.
    settings.CHAT_TUNING = settings.CHAT_TUNING.replace(delta_coalesce_ms=60_000,
                                                        delta_max_chars=20)
    # Chunk by chunk, so the size alone cuts the deltas: with the read tick one read may
    # bring more than the cap at once, and it goes out whole, in one delta.
    settings.CHAT_TUNING = settings.CHAT_TUNING.replace(read_tick_ms=0)
    upstream.answer = ANSWER
    _, _, ws = await connect(alice, uuid.uuid4())
    await ws.receive_type("state")
    await ws.send({"type": "message", "content": "count for me"})
    first = await ws.receive_type("delta", timeout=10)
    assert first["seq"] == 1 and 20 <= len(first["content"]) < 20 + len(" word59")
    end = await ws.receive_type("generation.end", timeout=20)
    assert end["status"] == "completed"
    deltas = ws.deltas(end["message_id"])
    assert "".join(d["content"] for d in deltas) == ANSWER
    assert [d["seq"] for d in deltas] == list(range(1, len(deltas) + 1))
    # Every delta but the last (the rest, sent at the end) reached the size.
    assert all(20 <= len(d["content"]) < 20 + len(" word59") for d in deltas[:-1])
    assert len(deltas) >= len(ANSWER) // (20 + len(" word59"))


async def test_slow_text_is_still_sent_when_the_window_ends(alice, upstream, connect, settings):
    settings.CHAT_TUNING = settings.CHAT_TUNING.replace(delta_coalesce_ms=30,
                                                        delta_max_chars=2000)
    upstream.answer = "alpha beta gamma delta"
    upstream.tokens_per_second = 10
    _, _, ws = await connect(alice, uuid.uuid4())
    await ws.receive_type("state")
    await ws.send({"type": "message", "content": "hi"})
    end = await ws.receive_type("generation.end", timeout=20)
    deltas = ws.deltas(end["message_id"])
    # Tokens 100 ms apart, a 30 ms window: a delta per token (a loaded machine may
    # merge a few), not one delta of everything at the end.
    assert "".join(d["content"] for d in deltas) == upstream.answer
    assert len(deltas) >= 2
