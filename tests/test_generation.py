"""The generation module on its own, without any WebSocket: what an SSE view or a
script gets from start_generation, and how it stops."""

import asyncio
import os
import time
import uuid
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from channels.layers import InMemoryChannelLayer
from channels_redis.pubsub import RedisPubSubChannelLayer
from django.utils import timezone

from chat import generation as gen
from chat.models import Conversation, Message, UsageRecord
from tests.eventually import eventually

pytestmark = pytest.mark.django_db(transaction=True)


REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"


class SlowLayer(RedisPubSubChannelLayer):
    """A Redis channel layer whose group_send takes ``delay`` seconds (a loaded Redis).
    Redis, not the in-memory layer: frames of a run use the layer only to reach other
    processes (chat.generation.fanout), which only a Redis layer does."""

    def __init__(self, delay, **kwargs):
        prefix = f"{os.environ.get('CHANNEL_PREFIX', '')}slow{uuid.uuid4().hex[:8]}"
        super().__init__(hosts=[REDIS_URL], prefix=prefix, **kwargs)
        self.delay = delay

    async def group_send(self, group, message):
        await asyncio.sleep(self.delay)
        # The pub/sub layer proxies its methods to a per-loop layer (no super() ones).
        await self._get_layer().group_send(group, message)


async def collect(queue):
    frames = []
    while True:
        frame = await asyncio.wait_for(queue.get(), 10)
        frames.append(frame)
        if frame["type"] == "generation.end":
            return frames


async def test_subscriber_gets_every_frame_in_order_ending_with_generation_end(alice, upstream):
    upstream.answer = "alpha beta gamma delta epsilon"
    generation = await gen.start_generation(alice, uuid.uuid4(), "hi")
    frames = await collect(generation.subscribe())
    # Frames queued before subscribe() returned are not lost either: the task had not
    # run yet, so the subscriber sees everything from the first delta on.
    deltas = [f for f in frames if f["type"] == "delta"]
    assert [d["seq"] for d in deltas] == list(range(1, len(deltas) + 1))
    assert "".join(d["content"] for d in deltas) == upstream.answer
    assert frames[-1]["status"] == "completed"
    assert await generation.wait() == frames[-1]


async def test_cancel_while_waiting_for_slow_channel_layer_closes_upstream_at_once(
    alice, upstream, settings
):
    # The task is blocked on back-pressure (the outbox is full because group_send is
    # slow), not on the stream: cancelling must still close the HTTP response at once,
    # long before the queued frames and generation.end are published.
    settings.CHAT_TUNING = settings.CHAT_TUNING.replace(outbox_limit=2)
    upstream.tokens_per_second = 200
    layer = SlowLayer(delay=0.3)
    generation = await gen.start_generation(alice, uuid.uuid4(), "hi", layer=layer)
    await upstream.until(lambda: upstream.requests and upstream.requests[-1].chunks_written >= 5)
    # The run waits on the slow layer (back-pressure): its outbox is full.
    await eventually(lambda: generation.queued_frames >= settings.CHAT_TUNING.outbox_limit)
    cancelled_at = time.monotonic()
    assert generation.cancel("stop")
    request = upstream.requests[-1]
    assert await upstream.until(lambda: request.client_closed_at is not None, timeout=1)
    assert request.client_closed_at - cancelled_at < 0.2
    end = await generation.wait()
    assert end["status"] == "cancelled"
    assert request.client_closed_at < time.monotonic() - 0.2  # closed well before the end
    await layer.flush()


async def test_stop_through_the_control_group_cancels_the_run(alice, upstream):
    # What a stop from another process looks like: only the channel layer connects them.
    generation = await gen.start_generation(alice, uuid.uuid4(), "hi")
    await upstream.until(lambda: upstream.requests and upstream.requests[-1].chunks_written >= 2)
    await generation.layer.group_send(
        gen.control_group_name(generation.conversation_id),
        {"type": "generation.stop", "user_id": alice.id},
    )
    end = await asyncio.wait_for(generation.wait(), 5)
    assert end["status"] == "cancelled"
    assert await upstream.until(lambda: upstream.requests[-1].client_closed_at is not None, 1)


async def test_snapshot_request_is_answered_on_the_reply_channel(alice, upstream):
    generation = await gen.start_generation(alice, uuid.uuid4(), "hi")
    queue = generation.subscribe()
    while (await queue.get())["type"] != "delta":
        pass
    layer = generation.layer
    reply = await layer.new_channel("test.")
    await layer.group_send(
        gen.control_group_name(generation.conversation_id),
        {"type": "generation.sync", "reply_channel": reply, "user_id": alice.id},
    )
    answer = await asyncio.wait_for(layer.receive(reply), 2)
    assert answer["type"] == "generation.snapshot"
    snapshot = answer["generation"]
    assert snapshot["message_id"] == generation.message_id
    assert snapshot["seq"] >= 1
    assert upstream.answer(generation.run.prompt).startswith(snapshot["content"])
    generation.cancel()
    await generation.wait()


async def test_demo_model_answers_through_the_sdk_without_an_api_key(alice, settings):
    settings.OPENAI_API_KEY = ""
    settings.OPENAI_BASE_URL = ""
    settings.DEMO_TOKENS_PER_SECOND = 2000
    assert gen.uses_demo_model()
    generation = await gen.start_generation(alice, uuid.uuid4(), "How do rockets work?")
    end = await asyncio.wait_for(generation.wait(), 20)
    assert end["status"] == "completed"
    assert end["usage"]["estimated"] is False
    message = await Message.objects.aget(id=generation.message_id)
    assert message.content.startswith("## About: How do rockets work?")
    assert "rockets" in message.content and "```python" in message.content
    assert end["usage"]["completion_tokens"] > 200


async def test_start_refuses_empty_and_oversized_messages(alice, settings):
    settings.CHAT_MAX_MESSAGE_CHARS = 10
    with pytest.raises(gen.InvalidRequest):
        await gen.start_generation(alice, uuid.uuid4(), "   ")
    with pytest.raises(gen.InvalidRequest):
        await gen.start_generation(alice, uuid.uuid4(), "x" * 11)
    assert await Conversation.objects.acount() == 0


def make_conversation(user, pairs, **fields):
    conversation = Conversation.objects.create(owner=user, title="t", **fields)
    base = timezone.now() - timedelta(hours=1)
    for i, (role, content) in enumerate(pairs):
        Message.objects.create(
            conversation=conversation, role=role, content=content,
            created_at=base + timedelta(seconds=i),
        )
    return conversation


def test_prompt_keeps_the_newest_messages_that_fit_the_context(alice, settings):
    settings.CHAT_CONTEXT_TOKENS = 400
    settings.CHAT_MAX_TOKENS = 100
    pairs = [("user" if i % 2 == 0 else "assistant", f"message {i} " + "word " * 40)
             for i in range(10)]
    conversation = make_conversation(alice, pairs, system_prompt="Be brief.")
    prompt = gen.build_prompt(conversation)
    assert prompt[0] == {"role": "system", "content": "Be brief."}
    kept = [m["content"] for m in prompt[1:]]
    assert kept == [content for _, content in pairs[-len(kept):]]
    assert 1 <= len(kept) < 10
    from chat.accounting import count_prompt_tokens
    from chat.generation.prompt import counted_prompt

    assert count_prompt_tokens(prompt) <= 400 - 100
    # What a start bills as its prompt: counted while building, the same count.
    assert counted_prompt(conversation) == (prompt, count_prompt_tokens(prompt))


def test_prompt_refuses_a_message_larger_than_the_context(alice, settings):
    settings.CHAT_CONTEXT_TOKENS = 200
    settings.CHAT_MAX_TOKENS = 100
    conversation = make_conversation(alice, [("user", "word " * 500)])
    with pytest.raises(gen.InvalidRequest):
        gen.build_prompt(conversation)


def test_stale_streaming_message_is_interrupted_with_its_usage(alice, settings):
    settings.CHAT_TUNING = settings.CHAT_TUNING.replace(lease_s=15)
    conversation = make_conversation(alice, [("user", "question")])
    message = Message.objects.create(
        conversation=conversation, role="assistant", status="streaming", model="test-model",
        content="partial text", heartbeat_at=timezone.now() - timedelta(seconds=16),
    )
    fresh = Message.objects.create(
        conversation=make_conversation(alice, [("user", "q")]), role="assistant",
        status="streaming", model="test-model", heartbeat_at=timezone.now(),
    )
    frames = gen.finish_stale()
    assert [f["message_id"] for f in frames] == [str(message.id)]
    message.refresh_from_db()
    assert message.status == "interrupted" and message.content == "partial text"
    usage = UsageRecord.objects.get(message=message)
    assert usage.estimated and usage.completion_tokens > 0 and usage.status == "interrupted"
    fresh.refresh_from_db()
    assert fresh.status == "streaming"
    assert gen.finish_stale() == []  # idempotent


async def test_start_finishes_a_stale_run_instead_of_answering_busy(alice, upstream):
    upstream.answer = "fresh answer"
    conversation = await sync_to_async(make_conversation)(alice, [("user", "q")])
    stale = await Message.objects.acreate(
        conversation=conversation, role="assistant", status="streaming", model="m",
        content="a partial answer", heartbeat_at=timezone.now() - timedelta(minutes=5),
    )
    layer = InMemoryChannelLayer()
    tab = gen.Inbox()
    await gen.watch(conversation.id, tab, layer=layer)
    generation = await gen.start_generation(alice, conversation.id, "again", layer=layer)
    # Open tabs learn that the stale run ended before they see the new one start.
    first = (await asyncio.wait_for(tab.get(), 2)).frames[0]
    assert first["type"] == "generation.end" and first["message_id"] == str(stale.id)
    assert first["status"] == "interrupted"
    end = await generation.wait()
    assert end["status"] == "completed"
    assert await Message.objects.filter(status="interrupted").acount() == 1
    assert await UsageRecord.objects.acount() == 2
    # The interrupted answer's text, which the user saw, is part of the new prompt.
    assert generation.run.prompt[1:] == [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a partial answer"},
        {"role": "user", "content": "again"}]
    await gen.unwatch(conversation.id, tab)


async def test_a_stop_reaches_the_provider_before_the_runs_task_takes_another_step(
    alice, upstream
):
    # A busy worker's event loop takes tens of ms per pass: the connection is closed
    # when the stop is asked, not when the run's task next runs.
    upstream.tokens_per_second = 200
    generation = await gen.start_generation(alice, uuid.uuid4(), "hi")
    await upstream.until(lambda: upstream.requests and upstream.requests[-1].chunks_written >= 5)
    request = upstream.requests[-1]
    assert generation.cancel("stop")
    time.sleep(0.5)  # noqa: ASYNC251 - blocks this loop on purpose: the run cannot step
    assert request.client_closed_at is not None
    end = await asyncio.wait_for(generation.wait(), 5)
    assert end["status"] == "cancelled"
    # What had arrived before the stop is kept, as with any stop.
    saved = await sync_to_async(Message.objects.get)(pk=generation.message_id)
    assert saved.content == "".join(generation.text)
    assert saved.content


async def test_a_run_whose_end_is_out_no_longer_counts_against_the_stream_cap(
    alice, upstream, settings
):
    # The tabs have the end; the run's task still publishes it to other processes (a
    # slow layer) before it forgets the run. A tab's next message is not "overloaded".
    settings.CHAT_MAX_STREAMS_PER_WORKER = 1
    upstream.answer = "A short answer."
    layer = SlowLayer(delay=0.3)
    generation = await gen.start_generation(alice, uuid.uuid4(), "hi", layer=layer)
    await collect(generation.subscribe())
    assert gen.Runtime.current().get(generation.conversation_id) is generation
    following = await gen.start_generation(alice, uuid.uuid4(), "and then", layer=layer)
    assert (await following.wait())["status"] == "completed"
    await generation.wait()
    await layer.flush()
