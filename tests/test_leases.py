"""Leases: a streaming answer is checkpointed while it streams, and a run whose process
stopped heartbeating is finished by any worker's sweeper (chat/generation/leases.py)."""

import asyncio
import uuid
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from chat import generation as gen
from chat.generation import leases
from chat.models import Conversation, Message, UsageRecord
from tests.eventually import eventually

pytestmark = pytest.mark.django_db(transaction=True)


def orphan_run(user, *, content="half an answer", heartbeat_age_s=60) -> Message:
    """A streaming answer left behind by a process that died ``heartbeat_age_s`` ago."""
    conversation = Conversation.objects.create(id=uuid.uuid4(), owner=user, title="t")
    Message.objects.create(conversation=conversation, role="user", content="question")
    beat = timezone.now() - timedelta(seconds=heartbeat_age_s)
    return Message.objects.create(
        conversation=conversation, role="assistant", content=content, status="streaming",
        model="test-model", heartbeat_at=beat, created_at=beat, worker="gone:1:abc",
    )


async def test_a_streaming_answer_is_checkpointed_while_it_streams(alice, upstream, connect):
    upstream.answer = " ".join(f"w{i}" for i in range(200))
    _, _, ws = await connect(alice)
    await ws.receive_type("state")
    await ws.send({"type": "message", "content": "go"})
    message_id = (await ws.receive_type("generation.start"))["message"]["id"]
    await ws.receive_until(lambda f: f["type"] == "delta" and f["seq"] >= 5)
    async def checkpointed():  # checkpoints every 200 ms in the upstream fixture
        return (await Message.objects.aget(id=message_id)).content.startswith("w0 w1")

    await eventually(checkpointed)
    saved = await Message.objects.aget(id=message_id)
    assert saved.status == "streaming"
    assert saved.content.startswith("w0 w1")
    assert timezone.now() - saved.heartbeat_at < timedelta(seconds=2)
    await ws.send({"type": "stop"})
    await ws.receive_type("generation.end")


async def test_the_sweeper_finishes_an_orphaned_run_and_tells_open_tabs(alice, connect):
    message = await sync_to_async(orphan_run)(alice)
    _, _, ws = await connect(alice, message.conversation_id)
    state = await ws.receive_type("state")
    assert state["generation"]["message_id"] == str(message.id)

    frames = await leases.sweep_once()
    assert [f["message_id"] for f in frames] == [str(message.id)]
    end = await ws.receive_type("generation.end")
    assert end["status"] == "interrupted" and end["usage"]["estimated"] is True
    saved = await Message.objects.aget(id=message.id)
    assert saved.status == "interrupted" and saved.content == "half an answer"
    usage = await UsageRecord.objects.aget(message_id=message.id)
    assert usage.completion_tokens > 0 and usage.prompt_tokens > 0


async def test_two_sweeps_at_once_finish_a_run_exactly_once(alice):
    message = await sync_to_async(orphan_run)(alice)
    # Two threads with their own database connections, as two worker processes.
    sweep = sync_to_async(leases.finish_expired, thread_sensitive=False)
    first, second = await asyncio.gather(sweep(), sweep())
    assert len(first) + len(second) == 1, "exactly one generation.end is published"
    assert await UsageRecord.objects.filter(message_id=message.id).acount() == 1


async def test_a_run_with_a_fresh_heartbeat_is_left_alone(alice):
    message = await sync_to_async(orphan_run)(alice, heartbeat_age_s=1)
    assert await leases.sweep_once() == []
    assert (await Message.objects.aget(id=message.id)).status == "streaming"


async def test_every_worker_runs_one_sweeper_per_event_loop(settings):
    settings.CHAT_TUNING = settings.CHAT_TUNING.replace(sweep_s=5)
    first = leases.ensure_sweeper()
    assert leases.ensure_sweeper() is first and not first.done()
    settings.CHAT_TUNING = settings.CHAT_TUNING.replace(sweep_s=0)
    assert leases.ensure_sweeper() is None


async def test_a_run_whose_lease_was_lost_stops_streaming_and_ends_once(alice, upstream, connect):
    upstream.answer = " ".join(f"w{i}" for i in range(400))
    _, _, ws = await connect(alice)
    await ws.receive_type("state")
    await ws.send({"type": "message", "content": "go"})
    message_id = (await ws.receive_type("generation.start"))["message"]["id"]
    await ws.receive_until(lambda f: f["type"] == "delta" and f["seq"] >= 3)
    request = upstream.requests[-1]
    # This process looked dead to a sweeper (e.g. a loop stalled longer than the lease).
    await Message.objects.filter(id=message_id).aupdate(
        heartbeat_at=timezone.now() - timedelta(seconds=60)
    )
    await leases.sweep_once()
    end = await ws.receive_type("generation.end")
    assert end["status"] == "interrupted"

    # At its next checkpoint the run finds its row final: it stops, upstream is closed.
    assert await asyncio.to_thread(upstream.wait_for, lambda: not request.open, 5)
    assert request.chunks_written < 400
    with pytest.raises(TimeoutError):  # read everything the socket gets for a second
        await ws.receive_until(lambda f: False, timeout=1)
    ends = [f for f in ws.frames if f["type"] == "generation.end"]
    assert len(ends) == 1, "one generation.end per run, even when it ends twice"
    saved = await Message.objects.aget(id=message_id)
    assert saved.status == "interrupted"
    assert await UsageRecord.objects.filter(message_id=message_id).acount() == 1


# --- log lines that must be true ----------------------------------------------------------
async def test_a_run_that_ends_during_a_checkpoint_is_not_said_to_have_lost_its_lease(
    alice, upstream, monkeypatch, caplog
):
    upstream.answer = "a short answer"
    generation = await gen.start_generation(alice, uuid.uuid4(), "hi")
    await upstream.until(lambda: upstream.requests and upstream.requests[-1].chunks_written)
    real_checkpoint_many = leases.checkpoint_many

    def after_the_run_has_ended(contents, *reasonings, **heartbeats):
        # A slow database: the batch runs only once the run has saved its own end.
        ended = Message.objects.filter(id=generation.message_id).exclude(status="streaming")
        assert upstream.wait_for(ended.exists, 10)
        return real_checkpoint_many(contents, *reasonings, **heartbeats)

    monkeypatch.setattr(leases, "checkpoint_many", after_the_run_has_ended)
    assert generation.message_id in {g.message_id for g in leases.running_here()}
    assert await leases.checkpoint_running() == set()
    end = await generation.wait()
    assert end["status"] == "completed" and end["error"] is None
    assert "lost its lease" not in caplog.text


async def test_a_stale_run_of_a_live_worker_is_not_said_to_be_gone(alice, caplog):
    # prepare_run and the sweepers finish runs whose lease expired; the process that
    # ran them may be alive (a stalled loop), this one included: say what is known.
    message = await sync_to_async(orphan_run)(alice)
    await Message.objects.filter(id=message.id).aupdate(worker=gen.WORKER_ID)
    frames = await sync_to_async(gen.finish_stale)(conversation_id=message.conversation_id)
    assert [f["status"] for f in frames] == ["interrupted"]
    lines = [r.getMessage() for r in caplog.records if str(message.id) in r.getMessage()]
    assert len(lines) == 1
    assert "gone" not in lines[0]
    assert "no checkpoint for" in lines[0] and "(this process)" in lines[0]
