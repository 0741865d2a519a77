"""A message to an existing conversation cannot change its model or system prompt: a
different one is refused with an ``invalid`` error and nothing is saved (the store's
start transaction, so the socket and every other start path agree). The settings are
changed with ``PATCH /api/conversations/{id}/``.
"""

import uuid

import pytest

from chat.models import Conversation, Message

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def two_models(settings, upstream):
    settings.CHAT_MODELS = ["test-model", "other-model"]
    upstream.answer = "Short answer."
    return upstream


async def start_conversation(connect, user, **settings_of_first_message):
    conversation_id = uuid.uuid4()
    _, _, ws = await connect(user, conversation_id)
    await ws.receive_type("state")
    await ws.send({"type": "message", "content": "first", **settings_of_first_message})
    await ws.receive_type("generation.end")
    return conversation_id, ws


async def message_count(conversation_id) -> int:
    return await Message.objects.filter(conversation_id=conversation_id).acount()


async def test_another_model_on_an_existing_conversation_is_refused_and_nothing_saved(
    alice, two_models, connect
):
    conversation_id, ws = await start_conversation(connect, alice, model="test-model")
    before = await message_count(conversation_id)
    requests = len(two_models.requests)

    await ws.send({"type": "message", "content": "second", "model": "other-model"})
    error = await ws.receive_type("error")
    assert error["code"] == "invalid"
    assert "test-model" in error["detail"]
    assert await message_count(conversation_id) == before
    assert len(two_models.requests) == requests
    assert (await Conversation.objects.aget(id=conversation_id)).model == "test-model"


async def test_the_same_model_or_none_on_an_existing_conversation_is_accepted(
    alice, two_models, connect
):
    conversation_id, ws = await start_conversation(connect, alice, model="other-model")
    for frame in ({"model": "other-model"}, {}, {"model": ""}):
        await ws.send({"type": "message", "content": "again", **frame})
        end = await ws.receive_type("generation.end")
        assert end["status"] == "completed", frame
    assert two_models.requests[-1].body["model"] == "other-model"
    assert await message_count(conversation_id) == 2 * 4


async def test_another_system_prompt_on_an_existing_conversation_is_refused(
    alice, two_models, connect
):
    conversation_id, ws = await start_conversation(connect, alice,
                                                   system_prompt="Answer in French.")
    before = await message_count(conversation_id)
    await ws.send({"type": "message", "content": "second",
                   "system_prompt": "Answer in German."})
    assert (await ws.receive_type("error"))["code"] == "invalid"
    assert await message_count(conversation_id) == before
    await ws.send({"type": "message", "content": "third",
                   "system_prompt": "Answer in French."})
    assert (await ws.receive_type("generation.end"))["status"] == "completed"
