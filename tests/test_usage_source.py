"""Every run's usage says where its numbers come from:
for each provider dialect of the loopback upstream, a completed run, a run stopped
while the model still thinks, one stopped after its first visible token and a failed
one, checking the saved answer and reasoning, the usage numbers and their ``source``.

The best source each provider allows: its final usage (``reported``), else its
running count (``running``: vLLM), else its own tokenizer (``tokenized``: llama.cpp),
else tiktoken (``estimated``, flagged when the provider hides its reasoning: OpenAI);
OpenRouter's generation record corrects any of them afterwards (``reported``).
"""

import uuid
from decimal import Decimal

import pytest

from chat import accounting
from chat import generation as gen
from chat.demo_dialects import generation_cost
from chat.generation import providers
from chat.generation.runtime import Runtime
from chat.models import Message, UsageRecord
from tests.eventually import eventually

pytestmark = pytest.mark.django_db(transaction=True)

ANSWER = "Rayleigh scattering makes the sky look blue, and the sunset red."
THOUGHTS = 6

# dialect -> (OPENAI_PROVIDER, model, source of a stopped run, source of a failed run)
DIALECTS = {
    "openai-reasoning": ("openai", "o4-mini", "estimated", "estimated"),
    "vllm": ("auto", "test-model", "running", "running"),
    "deepseek": ("deepseek", "test-model", "estimated", "estimated"),
    "ollama": ("ollama", "test-model", "estimated", "estimated"),
    "llamacpp": ("auto", "test-model", "tokenized", "tokenized"),
    "openrouter": ("openrouter", "test-model", "estimated", "estimated"),
    "no-stream-options": ("auto", "test-model", "estimated", "estimated"),
    "no-usage": ("auto", "test-model", "estimated", "estimated"),
}
# Dialects whose final usage arrives on a completed run.
REPORTS_USAGE = {"openai-reasoning", "vllm", "deepseek", "ollama", "llamacpp", "openrouter"}
# Dialects that stream (or bill) a reasoning phase.
THINKS = {"openai-reasoning", "vllm", "deepseek", "ollama", "llamacpp", "openrouter"}


@pytest.fixture(autouse=True)
def fresh_providers():
    """Detected profiles and refused parameters are remembered per process."""
    providers.forget()
    yield
    providers.forget()


@pytest.fixture
def speaking(upstream, settings):
    """The loopback upstream, fast enough to be quick and slow enough to be stopped
    in either phase: ``speaking(dialect)`` sets its dialect and our profile."""
    upstream.answer = ANSWER
    upstream.tokens_per_second = 40
    upstream.reasoning_tokens = THOUGHTS
    upstream.generation_delay = 0.2
    settings.CHAT_STREAM_IDLE_TIMEOUT_S = 5
    settings.CHAT_TUNING = settings.CHAT_TUNING.replace(usage_lookup_first_delay_s=0.1,
                                                        usage_lookup_window_s=5)

    def speak(dialect):
        profile, model, _, _ = DIALECTS[dialect]
        upstream.dialect = dialect
        settings.OPENAI_PROVIDER = profile
        settings.CHAT_MODEL = model
        return upstream

    return speak


async def record_of(message_id) -> tuple[Message, UsageRecord]:
    message = await Message.objects.aget(id=message_id)
    return message, await UsageRecord.objects.aget(message_id=message_id)


def tokens(server, text: str) -> int:
    """The loopback's own token count of ``text`` (its /tokenize and usage)."""
    return len(server.split(text)) if text else 0


async def run(alice, server, stop_when=None):
    generation = await gen.start_generation(alice, uuid.uuid4(), "Why is the sky blue?")
    if stop_when is not None:
        assert await server.until(lambda: server.requests and stop_when(server.requests[-1]),
                                  timeout=5)
        generation.cancel("stop")
    end = await generation.wait()
    request = server.requests[-1]
    if stop_when is not None:
        # A stop closes the upstream stream: the provider stops generating.
        assert await server.until(lambda: request.client_closed_at is not None, timeout=2)
    message, usage = await record_of(generation.message_id)
    assert end["usage"] == usage.to_dict()
    return message, usage, request


def assert_counts(server, dialect, message, usage, request, source):
    """The record's numbers for ``source`` and the saved text."""
    assert usage.source == source
    assert usage.estimated is (source != "reported")
    written_reasoning = "".join(request.reasoning_written)
    streamed = dialect in THINKS and dialect != "openai-reasoning"
    assert written_reasoning.startswith(message.reasoning)
    assert bool(message.reasoning) is (streamed and bool(request.reasoning_written))
    assert "".join(request.text_written).startswith(message.content)
    answer = tokens(server, message.content)
    if source == "reported":
        thought = len(request.reasoning_written)
        assert usage.completion_tokens == thought + len(request.text_written)
        if dialect in ("openai-reasoning", "openrouter", "deepseek"):
            assert usage.reasoning_tokens == thought
        if dialect in ("openai-reasoning", "openrouter", "deepseek"):
            assert 0 < usage.cached_tokens < usage.prompt_tokens
    elif source in ("running", "tokenized"):
        assert usage.completion_tokens == tokens(server, message.reasoning) + answer
        assert usage.prompt_tokens > 0
    else:
        assert usage.completion_tokens == (accounting.count_tokens(message.content)
                                           + accounting.count_tokens(message.reasoning))
        assert usage.prompt_tokens > 0
    assert usage.reasoning_hidden is (dialect == "openai-reasoning" and source != "reported")
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
async def test_a_completed_run_has_its_whole_answer_reasoning_and_best_usage(
        alice, speaking, dialect):
    server = speaking(dialect)
    message, usage, request = await run(alice, server)
    assert message.status == "completed"
    assert message.content == ANSWER
    if dialect in THINKS and dialect != "openai-reasoning":
        assert message.reasoning == "".join(request.reasoning_written) != ""
    assert_counts(server, dialect, message, usage, request,
                  "reported" if dialect in REPORTS_USAGE else "estimated")


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
async def test_a_run_stopped_after_its_first_visible_token_says_where_its_usage_comes_from(
        alice, speaking, dialect):
    server = speaking(dialect)
    message, usage, request = await run(alice, server,
                                        stop_when=lambda r: r.chunks_written >= 3)
    assert message.status == "cancelled" and message.content
    assert not request.completed
    assert_counts(server, dialect, message, usage, request, DIALECTS[dialect][2])


@pytest.mark.parametrize("dialect", sorted(THINKS))
async def test_a_run_stopped_while_the_model_thinks_keeps_its_partial_reasoning(
        alice, speaking, dialect):
    server = speaking(dialect)
    message, usage, request = await run(
        alice, server, stop_when=lambda r: 2 <= len(r.reasoning_written) < THOUGHTS - 1)
    assert message.status == "cancelled"
    assert message.content == "" and request.chunks_written == 0
    assert len(request.reasoning_written) < THOUGHTS
    if dialect != "openai-reasoning":
        assert message.reasoning
    assert_counts(server, dialect, message, usage, request, DIALECTS[dialect][2])


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
async def test_a_failed_run_keeps_its_text_and_says_where_its_usage_comes_from(
        alice, speaking, dialect):
    server = speaking(dialect)
    server.drop_after = 3  # the connection is cut after 3 visible tokens
    message, usage, request = await run(alice, server)
    assert message.status == "failed"
    assert message.content == "".join(request.text_written)
    assert_counts(server, dialect, message, usage, request, DIALECTS[dialect][3])


@pytest.mark.parametrize("stop_when", [None, lambda r: r.chunks_written >= 3,
                                       lambda r: len(r.reasoning_written) >= 2],
                         ids=["completed", "stopped-answering", "stopped-thinking"])
async def test_openrouter_s_generation_record_replaces_the_counts_and_cost(
        alice, speaking, stop_when):
    server = speaking("openrouter")
    message, _, request = await run(alice, server, stop_when=stop_when)

    runtime = Runtime.current()
    assert await eventually(lambda: runtime.background_tasks() == 0, timeout=5)
    usage = await UsageRecord.objects.aget(message_id=message.id)
    assert (usage.source, usage.estimated, usage.reasoning_hidden) == ("reported", False, False)
    completion = len(request.reasoning_written) + len(request.text_written)
    assert usage.completion_tokens == completion
    assert usage.reasoning_tokens == len(request.reasoning_written)
    prompt = usage.prompt_tokens
    assert usage.cost_usd == Decimal(str(generation_cost(prompt, completion))).quantize(
        Decimal("0.00000001"))


async def test_the_generation_lookup_is_a_runtime_task_cancelled_at_shutdown(
        alice, speaking, settings):
    server = speaking("openrouter")
    server.generation_delay = 60  # the provider's record never appears in this test
    message, usage, _ = await run(alice, server, stop_when=lambda r: r.chunks_written >= 2)
    runtime = Runtime.current()
    assert runtime.background_tasks() == 1
    await runtime.shutdown()
    assert runtime.background_tasks() == 0
    message, usage = await record_of(message.id)
    assert usage.source == "estimated"
