"""The configured API key never reaches a user, in part or whole: not in a provider's
error message (masked before it is cut to length), and not in answer or reasoning text
a proxy echoes it in, also when the stream's chunks split it.

Over the WebSocket with the real loopback upstream (chat.demo_model.UpstreamServer)
scripted to fail with a message that echoes the key, or to answer with it; the saved
message and the REST API are checked too."""

import uuid

import pytest
from asgiref.sync import sync_to_async

from chat.demo_model import split_tokens
from chat.generation.providers import StreamEvent, base
from chat.models import Message

pytestmark = pytest.mark.django_db(transaction=True)

KEY = "sk-test-SECRET123"
# Any 8 characters that start the key: a longer prefix contains them.
PREFIX = KEY[:8]


@pytest.fixture
def keyed(upstream, settings):
    """The loopback upstream, with the app configured to send it ``KEY``."""
    settings.OPENAI_API_KEY = KEY
    return upstream


def split_inside_the_key(cut: int):
    """A chunking of the answer (UpstreamServer.split) that cuts the key after ``cut``
    characters: its two parts arrive in two chunks."""
    def split(text: str) -> list[str]:
        pieces = []
        for piece in split_tokens(text):
            at = piece.find(KEY)
            if at == -1:
                pieces.append(piece)
            else:
                pieces += [piece[:at + cut], piece[at + cut:]]
        return pieces
    return split


def rest_messages(client, user, conversation_id) -> list[dict]:
    client.force_login(user)
    response = client.get(f"/api/conversations/{conversation_id}/messages/")
    assert response.status_code == 200
    return response.json()["results"]


async def run(connect, user, content="Tell me about keys"):
    """One run in a new conversation until its end: ``(socket, conversation id,
    message id, generation.end frame)``."""
    conversation_id = uuid.uuid4()
    _, _, ws = await connect(user, conversation_id)
    await ws.receive_type("state")
    await ws.send({"type": "message", "content": content})
    start = await ws.receive_type("generation.start")
    end = await ws.receive_type("generation.end", timeout=20)
    return ws, conversation_id, start["message"]["id"], end


async def test_a_provider_error_echoing_the_key_past_the_cut_shows_none_of_it(
    alice, keyed, connect, client
):
    """OpenAI's 401 names the key it was given: after 256 characters of message the key
    straddles the 300-character cut, and no part of it may be left."""
    keyed.fail_status = 401
    keyed.fail_message = "A" * 256 + " Incorrect API key provided: " + KEY
    ws, conversation_id, message_id, end = await run(connect, alice)
    assert end["status"] == "failed"
    assert "HTTP 401" in end["error"] and "Incorrect API key provided: ***" in end["error"]
    for frame in ws.frames:
        assert PREFIX not in str(frame)
    saved = await Message.objects.aget(id=message_id)
    assert PREFIX not in saved.error
    listed = await sync_to_async(rest_messages)(client, alice, conversation_id)
    answer = next(m for m in listed if m["id"] == message_id)
    assert answer["error"] == end["error"]
    assert PREFIX not in answer["error"]


@pytest.mark.parametrize("cut", [None, 1, 8, len(KEY) - 1])
async def test_an_answer_echoing_the_key_is_sent_and_saved_with_the_key_masked(
    alice, keyed, connect, cut
):
    """cut None: the key in one chunk; else its first ``cut`` characters end one chunk
    and the rest begins the next."""
    answer = f"The key you configured is {KEY} and nothing else is secret here."
    keyed.answer = answer
    if cut is not None:
        keyed.split = split_inside_the_key(cut)
    ws, _, message_id, end = await run(connect, alice)
    assert end["status"] == "completed"
    if cut is not None:
        written = keyed.requests[-1].text_written
        assert KEY in "".join(written) and not any(KEY in chunk for chunk in written)
    received = ws.text(message_id)
    assert received == answer.replace(KEY, "***")
    for delta in ws.deltas(message_id):
        assert PREFIX not in delta["content"]
    saved = await Message.objects.aget(id=message_id)
    assert saved.content == received


@pytest.mark.parametrize("cut", [None, 4])
async def test_reasoning_echoing_the_key_is_sent_and_saved_with_the_key_masked(
    alice, keyed, connect, cut
):
    """A reasoning model (DeepSeek's delta.reasoning_content) whose thinking repeats
    the question, which holds the key."""
    keyed.dialect = "deepseek"
    keyed.answer = "A short answer."
    if cut is not None:
        keyed.split = split_inside_the_key(cut)
    ws, _, message_id, end = await run(connect, alice, content=f"Check {KEY} for me")
    assert end["status"] == "completed"
    thinking = "".join(f["content"] for f in ws.frames
                       if f["type"] == "reasoning" and f["message_id"] == message_id)
    assert "***" in thinking and PREFIX not in thinking
    saved = await Message.objects.aget(id=message_id)
    assert saved.reasoning == thinking
    assert saved.content == ws.text(message_id) == "A short answer."


def test_a_key_prefix_left_at_the_end_of_a_stream_is_masked_and_short_tails_are_kept():
    """The stream ends inside the key (max_tokens reached mid-key): 8 or more of its
    characters come out masked; a shorter tail that merely could begin the key is text."""
    masks = base.StreamMasks(KEY)
    sent = masks.event(StreamEvent(content="cut here: " + KEY[:12]))
    assert sent.content == "cut here: "
    assert masks.flush().content == "***"
    sent = masks.event(StreamEvent(content="this is"))
    assert sent.content == "this i"  # "s" could begin the key: held for the next chunk
    last = masks.event(StreamEvent(content="", finish_reason="stop"))
    assert last.content == "s"
