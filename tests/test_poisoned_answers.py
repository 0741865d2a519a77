"""One poisoned answer must not end other users' answers.

Provider text is untrusted: a delta with NUL (PostgreSQL refuses it) or a lone
surrogate (no driver can encode it) once made the batched checkpoint fail for every
run of the process, so healthy runs stopped heartbeating and were swept. Provider text
is cleaned where it is read; the batch isolates a row the database refuses anyway; and
an answer that cannot be saved is never reported ``completed``.
"""

import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from chat import generation as gen
from chat.generation import leases
from chat.models import Conversation, Message, UsageRecord
from tests.eventually import eventually

pytestmark = pytest.mark.django_db(transaction=True)

# At 50 tokens/s: the poisoned answer streams for 3 s after its poison, longer than a
# lease plus a sweep; the healthy one for 5 s, so it is still running meanwhile.
HEALTHY = " ".join(f"h{i}" for i in range(250))
TAIL = " ".join(f"p{i}" for i in range(150))
# As the upstream writes it, JSON-escaped: "\u0000" and "\udcff" in the SSE payload.
POISONED = f"before nul\x00here and lone\udcffhere after {TAIL}"
POISONED_SAVED = f"before nulhere and lone\ufffdhere after {TAIL}"


def answer(messages):
    question = messages[-1]["content"]
    return POISONED if "poison" in question else HEALTHY


async def ask(ws, content):
    await ws.send({"type": "message", "content": content})
    return (await ws.receive_type("generation.start"))["message"]["id"]


async def test_a_poisoned_answer_does_not_end_another_users_answer(
    alice, bob, upstream, connect, settings
):
    # Short leases, so a run that misses its heartbeats is swept within the test.
    settings.CHAT_TUNING = settings.CHAT_TUNING.replace(lease_s=2, sweep_s=0.3)
    upstream.answer = answer
    _, _, healthy_ws = await connect(bob)
    await healthy_ws.receive_type("state")
    poisoned_conversation = uuid.uuid4()
    _, _, poisoned_ws = await connect(alice, poisoned_conversation)
    await poisoned_ws.receive_type("state")

    healthy_id = await ask(healthy_ws, "a healthy question")
    await healthy_ws.receive_until(lambda f: f["type"] == "delta")
    poisoned_id = await ask(poisoned_ws, "a poison question")

    poisoned_end = await poisoned_ws.receive_type("generation.end", timeout=20)
    assert poisoned_end["status"] == "completed" and poisoned_end["error"] is None
    assert poisoned_ws.text(poisoned_id) == POISONED_SAVED
    poisoned = await Message.objects.aget(id=poisoned_id)
    assert (poisoned.status, poisoned.content) == ("completed", POISONED_SAVED)

    healthy_end = await healthy_ws.receive_type("generation.end", timeout=20)
    assert healthy_end["status"] == "completed", healthy_end
    assert healthy_ws.text(healthy_id) == HEALTHY
    healthy = await Message.objects.aget(id=healthy_id)
    assert (healthy.status, healthy.content) == ("completed", HEALTHY)
    assert await UsageRecord.objects.filter(
        message_id__in=[healthy_id, poisoned_id], estimated=False
    ).acount() == 2

    # The poisoned conversation is not left `busy`.
    upstream.answer = "all good again"
    next_id = await ask(poisoned_ws, "next question")
    end = await poisoned_ws.receive_type("generation.end")
    assert end["status"] == "completed"
    assert (await Message.objects.aget(id=next_id)).content == "all good again"


def streaming_row(user, content="saved so far") -> Message:
    conversation = Conversation.objects.create(owner=user, title="t")
    Message.objects.create(conversation=conversation, role="user", content="question")
    return Message.objects.create(
        conversation=conversation, role="assistant", content=content, status="streaming",
        model="test-model", heartbeat_at=timezone.now() - timedelta(seconds=10),
    )


def test_a_checkpoint_batch_saves_the_other_runs_when_the_database_refuses_one_row(alice):
    healthy, refused, finished = (streaming_row(alice) for _ in range(3))
    Message.objects.filter(id=finished.id).update(status="completed")
    before = timezone.now()

    # A lone surrogate cannot be encoded by any database driver (what the boundary
    # cleaning prevents; here it reaches the checkpoint as if the cleaning missed it).
    result = leases.checkpoint_many({
        str(healthy.id): "healthy text",
        str(refused.id): "refused \udcff text",
        str(finished.id): "too late",
    })

    assert result.lost == {str(finished.id)}
    assert result.unsaved == {str(refused.id)}
    healthy.refresh_from_db()
    assert healthy.content == "healthy text" and healthy.heartbeat_at >= before
    refused.refresh_from_db()  # its lease is kept; its text is the last one saved
    assert refused.content == "saved so far" and refused.heartbeat_at >= before
    finished.refresh_from_db()
    assert finished.content == "saved so far" and finished.status == "completed"


async def test_an_answer_whose_text_cannot_be_saved_ends_failed_and_frees_the_conversation(
    alice, upstream, connect
):
    upstream.answer = " ".join(f"w{i}" for i in range(100))  # 2 s at 50 tokens/s
    _, _, ws = await connect(alice)
    await ws.receive_type("state")
    message_id = await ask(ws, "question")
    await ws.receive_until(lambda f: f["type"] == "delta" and f["seq"] >= 3)
    running = next(g for g in gen.Runtime.current().running() if g.message_id == message_id)
    async def saved_text():  # a checkpoint (every 200 ms) has saved some text
        return (await Message.objects.aget(id=message_id)).content

    checkpointed = await eventually(saved_text)
    assert checkpointed
    # Text the database refuses, put past the boundary that cleans provider text: the
    # run must not be reported completed, nor leave the conversation busy.
    running.text.append(" \udcff")

    end = await ws.receive_type("generation.end")
    assert end["status"] == "failed"
    assert "could not be saved" in end["error"]
    message = await Message.objects.aget(id=message_id)
    assert message.status == "failed" and "could not be saved" in message.error
    assert message.content.startswith(checkpointed)
    assert "\udcff" not in message.content
    assert await UsageRecord.objects.filter(message_id=message_id).acount() == 1

    upstream.answer = "fine"
    next_id = await ask(ws, "next question")
    assert (await ws.receive_type("generation.end"))["status"] == "completed"
    assert (await Message.objects.aget(id=next_id)).content == "fine"
