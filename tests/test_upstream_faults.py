"""What real providers send must not fail a run.

Each fault the loopback upstream can produce (``chat.demo_model.FAULTS``) is driven
through the real WebSocket, SDK and database: the run ends with a clear status, the
text the user saw is the text saved, the error is the provider's own words where it
gave some, the usage record is the provider's report whenever it sent one (estimated
only when it did not), and the next message of the conversation works.
"""

import time

import pytest

from chat.demo_model import FAULTS, split_tokens
from chat.models import Message, UsageRecord

pytestmark = pytest.mark.django_db(transaction=True)

ANSWER = " ".join(f"word{i}" for i in range(12))
TOKENS = split_tokens(ANSWER)
HEAD = "".join(TOKENS[:3])  # mid-stream faults happen after 3 content chunks (fault_after)


def with_inserted(text: str) -> str:
    return HEAD + text + "".join(TOKENS[3:])


# fault -> (status, saved text, words of the error (None: no error), usage reported?)
EXPECTED = {
    "unauthorized": ("failed", "", "HTTP 401: Incorrect API key provided.", False),
    "rate_limited": (
        "failed", "", "HTTP 429: Rate limit reached for requests. Retry after 7 s.", False
    ),
    "server_error": (
        "failed", "", "HTTP 500: The server had an error while processing your request.",
        False,
    ),
    "hang_before_headers": ("failed", "", "did not start answering within 0.5 s", False),
    "drop_mid_stream": ("failed", HEAD, "connection to the model provider was lost", False),
    "stall_mid_stream": ("failed", HEAD, "sent nothing for 0.5 s", False),
    "end_mid_stream": ("failed", HEAD, "ended the answer before it was complete", False),
    "malformed_json": ("failed", HEAD, "sent a malformed chunk", False),
    "no_choices": ("completed", ANSWER, None, True),
    "error_event": (
        "failed", HEAD,
        "reported an error: The model is overloaded; the stream was interrupted.", False,
    ),
    "no_done_close": ("completed", ANSWER, None, True),
    "no_done_hang": ("completed", ANSWER, None, True),
    # NUL dropped, the lone surrogate replaced by U+FFFD.
    "nul": ("completed", with_inserted(" nulhere"), None, True),
    "lone_surrogate": ("completed", with_inserted(" lone\ufffdhere"), None, True),
}


@pytest.fixture
def faulty(upstream, settings):
    """The test upstream with a short answer and short timeouts (0.5 s to start
    answering, 0.5 s of silence), so every fault ends in well under a second."""
    settings.OPENAI_FIRST_BYTE_TIMEOUT_S = 0.5
    settings.CHAT_STREAM_IDLE_TIMEOUT_S = 0.5
    settings.CHAT_TUNING = settings.CHAT_TUNING.replace(sdk_timeout_s=5)
    upstream.answer = ANSWER
    upstream.tokens_per_second = 200
    upstream.retry_after = 7
    return upstream


async def ask(ws, content):
    """Send a message; returns (assistant message id, generation.end frame, seconds)."""
    started = time.monotonic()
    await ws.send({"type": "message", "content": content})
    message_id = (await ws.receive_type("generation.start"))["message"]["id"]
    end = await ws.receive_type("generation.end", timeout=15)
    assert end["message_id"] == message_id
    return message_id, end, time.monotonic() - started


def test_every_fault_the_upstream_can_produce_is_covered():
    assert set(EXPECTED) == set(FAULTS)


@pytest.mark.parametrize("fault", list(EXPECTED))
async def test_a_faulty_provider_ends_the_run_clearly_and_the_next_message_works(
    alice, faulty, connect, fault
):
    status, text, error, reported = EXPECTED[fault]
    faulty.fault = fault
    _, _, ws = await connect(alice)
    await ws.receive_type("state")
    message_id, end, seconds = await ask(ws, "first question")

    # What the tab is told.
    assert end["status"] == status
    if error is None:
        assert end["error"] is None
    else:
        assert error in end["error"]
    assert end["usage"]["estimated"] is (not reported)
    assert ws.text(message_id) == text
    # What is saved.
    message = await Message.objects.aget(id=message_id)
    assert (message.status, message.content) == (status, text)
    assert message.error == (end["error"] or "")
    usage = await UsageRecord.objects.aget(message_id=message_id)
    assert usage.status == status and usage.estimated is (not reported)
    if reported:
        # The provider's own count (the demo counts its tokens without the poison).
        assert usage.completion_tokens == len(TOKENS)
    # Timeouts are the settings', not the SDK's 60 s (times two with its retry).
    assert seconds < 5
    request = faulty.requests[-1]
    assert await faulty.until(lambda: not request.open, 2), "upstream stream left open"

    faulty.fault = None
    next_id, next_end, _ = await ask(ws, "second question")
    assert next_end["status"] == "completed" and next_end["error"] is None
    assert ws.text(next_id) == ANSWER
    assert (await Message.objects.aget(id=next_id)).content == ANSWER


async def test_a_provider_that_never_answers_is_given_up_after_the_first_byte_timeout(
    alice, faulty, connect, settings
):
    # The SDK's retry must not double the wait: the budget covers every attempt.
    settings.OPENAI_MAX_RETRIES = 1
    settings.OPENAI_FIRST_BYTE_TIMEOUT_S = 1
    faulty.fault = "hang_before_headers"
    _, _, ws = await connect(alice)
    await ws.receive_type("state")
    _, end, seconds = await ask(ws, "anyone there?")
    assert end["status"] == "failed"
    assert "did not start answering within 1 s" in end["error"]
    assert 1 <= seconds < 3
    assert await faulty.until(lambda: faulty.open_streams == 0, 2)


async def test_a_stop_after_the_usage_arrived_keeps_the_reported_usage(
    alice, faulty, connect, settings
):
    # A provider that hangs after its usage chunk; the user stops before [DONE].
    settings.CHAT_STREAM_IDLE_TIMEOUT_S = 30
    faulty.fault = "no_done_hang"
    _, _, ws = await connect(alice)
    await ws.receive_type("state")
    await ws.send({"type": "message", "content": "question"})
    message_id = (await ws.receive_type("generation.start"))["message"]["id"]
    await ws.receive_until(lambda f: ws.text(message_id) == ANSWER)
    await ws.send({"type": "stop"})
    end = await ws.receive_type("generation.end")
    assert end["status"] == "cancelled"
    assert end["usage"]["estimated"] is False
    assert end["usage"]["completion_tokens"] == len(TOKENS)
    usage = await UsageRecord.objects.aget(message_id=message_id)
    assert not usage.estimated and usage.completion_tokens == len(TOKENS)
