"""Each provider profile gets the request its documentation asks for, and its stream's
reasoning and usage are read where that provider puts them.

At the level of ``stream_answer`` (events and StreamMeta) against the loopback upstream
speaking each provider's dialect (chat/demo_dialects.py); the saved answer, the usage
record's source and the UI are the end-to-end tests' (accounting).
"""

import asyncio
import contextlib
from decimal import Decimal

import pytest

from chat.demo_model import split_tokens
from chat.generation.errors import UpstreamFailure
from chat.generation.providers import StreamMeta
from chat.generation.providers import profiles as providers
from chat.generation.providers.chat_completions import new_client, stream_answer
from tests.eventually import eventually

ANSWER = "Rayleigh scattering makes the sky look blue."
QUESTION = [{"role": "user", "content": "Why is the sky blue?"}]
USAGE_KEYS = {"prompt_tokens", "completion_tokens", "reasoning_tokens", "cached_tokens"}


@pytest.fixture
def dialects(upstream, settings):
    """The test upstream with a short answer, 5 reasoning tokens, fast pacing."""
    upstream.answer = ANSWER
    upstream.tokens_per_second = 200
    upstream.reasoning_tokens = 5
    upstream.generation_delay = 0.3
    settings.CHAT_STREAM_IDLE_TIMEOUT_S = 5
    return upstream


async def run(server, *, model="test-model", until=None):
    """Stream one answer; ``(events, meta)``. ``until(events)`` true stops it (the
    generator closed, as a stop does)."""
    client = new_client(server.base_url, "test-key-not-secret")
    meta, events = StreamMeta(), []
    try:
        stream = stream_answer(client, model=model, messages=QUESTION, max_tokens=100,
                               label="test", meta=meta)
        async with contextlib.aclosing(stream):
            async for event in stream:
                events.append(event)
                if until is not None and until(events):
                    break
    finally:
        await client.close()
    return events, meta


def text(events, kind="content"):
    return "".join(getattr(e, kind) for e in events)


def final_usage(events):
    usages = [e.usage for e in events if e.usage is not None]
    return usages[-1] if usages else None


# --- the request ----------------------------------------------------------------------
EXPECTED_BODY = {
    "openai": {"max_completion_tokens": 100, "stream_options": {"include_usage": True}},
    "vllm": {"max_tokens": 100,
             "stream_options": {"include_usage": True, "continuous_usage_stats": True}},
    "ollama": {"max_tokens": 100, "stream_options": {"include_usage": True}},
    "llamacpp": {"max_tokens": 100, "stream_options": {"include_usage": True}},
    "openrouter": {"max_tokens": 100, "stream_options": {"include_usage": True}},
    "deepseek": {"max_tokens": 100, "stream_options": {"include_usage": True}},
}


@pytest.mark.parametrize("profile", sorted(EXPECTED_BODY))
async def test_each_profile_sends_exactly_its_documented_request(dialects, settings, profile):
    settings.OPENAI_PROVIDER = profile
    events, meta = await run(dialects)
    assert text(events) == ANSWER
    assert meta.profile == profile
    assert dialects.requests[-1].body == {
        "model": "test-model", "messages": QUESTION, "stream": True, **EXPECTED_BODY[profile]
    }


def test_auto_detection_reads_the_base_url_first():
    assert providers.profile_from_url(None) == "openai"
    assert providers.profile_from_url("https://api.openai.com/v1") == "openai"
    assert providers.profile_from_url("https://openrouter.ai/api/v1") == "openrouter"
    assert providers.profile_from_url("https://api.deepseek.com") == "deepseek"
    assert providers.profile_from_url("http://10.0.0.5:11434/v1") == "ollama"
    assert providers.profile_from_url("http://127.0.0.1:8000/v1") is None


@pytest.mark.parametrize("dialect, profile", [("vllm", "vllm"), ("llamacpp", "llamacpp"),
                                              (None, "generic")])
async def test_auto_detection_asks_a_local_server_its_model_list_once(
        dialects, dialect, profile):
    dialects.dialect = dialect
    # A burst of first runs on a fresh worker: one GET /models for all of them.
    firsts = await asyncio.gather(*(run(dialects) for _ in range(8)))
    _, later = await run(dialects)
    assert {meta.profile for _, meta in firsts} == {later.profile} == {profile}
    assert dialects.model_lists == 1


# --- reasoning and usage, per dialect -------------------------------------------------------
async def test_vllm_streams_reasoning_then_content_with_a_running_usage_on_every_chunk(
        dialects):
    dialects.dialect = "vllm"
    events, meta = await run(dialects)
    record = dialects.requests[-1]
    assert text(events, "reasoning") == "".join(record.reasoning_written)
    assert len(record.reasoning_written) == 5
    assert text(events) == ANSWER
    first_content = next(i for i, e in enumerate(events) if e.content)
    assert not any(e.reasoning for e in events[first_content:])
    running = [e.running_usage["completion_tokens"] for e in events if e.content]
    assert running == list(range(6, 6 + len(split_tokens(ANSWER))))
    usage = final_usage(events)
    assert set(usage) == USAGE_KEYS
    assert usage["completion_tokens"] == 5 + len(split_tokens(ANSWER))
    assert meta.profile == "vllm" and meta.usage_requested and not meta.hidden_reasoning


@pytest.mark.parametrize("dialect, profile", [
    ("deepseek", "deepseek"), ("ollama", "ollama"), ("llamacpp", "llamacpp"),
    ("openrouter", "openrouter")])
async def test_reasoning_text_is_read_where_each_provider_sends_it(
        dialects, settings, dialect, profile):
    settings.OPENAI_PROVIDER = profile
    dialects.dialect = dialect
    events, _ = await run(dialects)
    record = dialects.requests[-1]
    assert text(events, "reasoning") == "".join(record.reasoning_written) != ""
    assert text(events) == ANSWER
    assert all(e.running_usage is None for e in events)


async def test_deepseek_usage_has_reasoning_tokens_and_its_cache_hits_as_cached_tokens(
        dialects, settings):
    settings.OPENAI_PROVIDER = "deepseek"
    dialects.dialect, dialects.cached_tokens = "deepseek", 3
    events, _ = await run(dialects)
    usage = final_usage(events)
    assert usage["reasoning_tokens"] == 5
    assert usage["cached_tokens"] == 3
    assert usage["completion_tokens"] == 5 + len(split_tokens(ANSWER))


async def test_openai_reasoning_models_get_max_completion_tokens_and_bill_hidden_reasoning(
        dialects, settings):
    settings.OPENAI_PROVIDER = "openai"
    dialects.dialect, dialects.cached_tokens = "openai-reasoning", 4
    for model in ("o4-mini", "o3", "gpt-5-mini", "o1"):
        events, meta = await run(dialects, model=model)
        record = dialects.requests[-1]
        assert record.status == 200 and "max_tokens" not in record.body
        assert text(events) == ANSWER and text(events, "reasoning") == ""
        usage = final_usage(events)
        assert usage["reasoning_tokens"] == len(record.reasoning_written) == 5
        assert usage["cached_tokens"] == 4
        assert meta.hidden_reasoning
    assert all(r.status == 200 for r in dialects.requests)
    _, meta = await run(dialects, model="gpt-4o-mini")
    assert not meta.hidden_reasoning


async def test_a_server_asking_for_max_completion_tokens_is_retried_once_and_remembered(
        dialects, settings):
    settings.OPENAI_PROVIDER = "vllm"  # any profile that sends max_tokens
    dialects.dialect = "openai-reasoning"
    events, _ = await run(dialects, model="o4-mini")
    assert text(events) == ANSWER
    assert [r.status for r in dialects.requests] == [400, 200]
    assert dialects.requests[1].body["max_completion_tokens"] == 100
    await run(dialects, model="o4-mini")
    assert [r.status for r in dialects.requests] == [400, 200, 200]


async def test_a_400_naming_stream_options_is_retried_once_without_it_and_remembered(
        dialects):
    dialects.dialect = "no-stream-options"
    events, meta = await run(dialects)
    assert text(events) == ANSWER
    assert [r.status for r in dialects.requests] == [400, 200]
    assert "stream_options" not in dialects.requests[1].body
    assert final_usage(events) is None and not meta.usage_requested
    _, meta = await run(dialects)
    assert [r.status for r in dialects.requests] == [400, 200, 200]
    assert not meta.usage_requested


async def test_an_unrelated_400_is_not_retried(dialects):
    dialects.fault = None
    dialects.fail_status = 400
    with pytest.raises(UpstreamFailure, match="HTTP 400"):
        await run(dialects)
    assert len(dialects.requests) == 1


async def test_a_server_that_never_sends_usage_ends_the_run_without_one(dialects):
    dialects.dialect = "no-usage"
    events, meta = await run(dialects)
    assert text(events) == ANSWER
    assert final_usage(events) is None and meta.usage_requested
    assert "stream_options" in dialects.requests[-1].body


# --- stop ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dialect", ["vllm", "openai-reasoning"])
async def test_a_stop_while_the_model_thinks_closes_upstream_at_once(dialects, settings,
                                                                     dialect):
    settings.OPENAI_PROVIDER = "openai" if dialect == "openai-reasoning" else "auto"
    dialects.dialect, dialects.reasoning_tokens, dialects.tokens_per_second = dialect, 400, 50
    # vLLM: stop after 2 reasoning chunks; OpenAI hides them: stop at the role chunk.
    events, _ = await run(dialects, model="o4-mini", until=lambda events: (
        dialect == "openai-reasoning" or sum(1 for e in events if e.reasoning) >= 2))
    record = dialects.requests[-1]
    assert await eventually(lambda: record.client_closed_at is not None, timeout=1)
    generated = len(record.reasoning_written)
    await asyncio.sleep(0.1)
    assert len(record.reasoning_written) == generated < 10
    assert record.chunks_written == 0 and text(events) == ""


# --- look-ups after a run ----------------------------------------------------------------------
@pytest.mark.parametrize("profile", ["llamacpp", "vllm"])
async def test_tokenize_counts_text_with_the_servers_tokenizer(dialects, profile):
    dialects.dialect = profile
    client = new_client(dialects.base_url, "test-key-not-secret")
    try:
        count = await providers.tokenize(client, providers.PROFILES[profile], "test-model",
                                         ANSWER)
        assert count == len(split_tokens(ANSWER))
        # No tokenizer in the profile, or a server without /tokenize: None, no error.
        assert await providers.tokenize(client, providers.PROFILES["ollama"], "m", ANSWER) \
            is None
        dialects.dialect = None
        assert await providers.tokenize(client, providers.PROFILES[profile], "m", ANSWER) \
            is None
    finally:
        await client.close()


async def test_tokenize_of_an_unreachable_server_is_none():
    client = new_client("http://127.0.0.1:9/v1", "none")
    try:
        assert await providers.tokenize(client, providers.PROFILES["vllm"], "m", "x") is None
        assert await providers.lookup_generation(client, "gen-1") is None
    finally:
        await client.close()


async def test_openrouter_generation_lookup_gives_the_true_count_of_a_stopped_run(
        dialects, settings):
    settings.OPENAI_PROVIDER = "openrouter"
    dialects.dialect = "openrouter"
    # Slower than the read tick (CHAT_TUNING.read_tick_ms): at 200 tokens/s the whole
    # answer is written within one tick, and the run would not be stopped mid-way.
    dialects.tokens_per_second = 20
    events, meta = await run(dialects, until=lambda events: text(events) != "")
    record = dialects.requests[-1]
    assert meta.generation_id == record.generation_id and meta.generation_id.startswith("gen-")
    await eventually(lambda: record.client_closed_at is not None, timeout=1)
    client = new_client(dialects.base_url, "test-key-not-secret")
    try:
        assert await providers.lookup_generation(client, meta.generation_id) is None  # 404
        found = await eventually(
            lambda: providers.lookup_generation(client, meta.generation_id), timeout=3)
    finally:
        await client.close()
    generated = len(record.reasoning_written) + record.chunks_written
    assert found["completion_tokens"] == generated < 5 + len(split_tokens(ANSWER))
    assert found["reasoning_tokens"] == 5
    assert found["prompt_tokens"] > 0 and found["cached_tokens"] >= 0
    assert isinstance(found["cost_usd"], Decimal) and found["cost_usd"] > 0


async def test_openrouter_usage_in_the_stream_has_reasoning_and_cached_tokens(
        dialects, settings):
    settings.OPENAI_PROVIDER = "openrouter"
    dialects.dialect, dialects.cached_tokens = "openrouter", 2
    events, meta = await run(dialects)
    usage = final_usage(events)
    assert usage == {"prompt_tokens": usage["prompt_tokens"],
                     "completion_tokens": 5 + len(split_tokens(ANSWER)),
                     "reasoning_tokens": 5, "cached_tokens": 2}
    assert meta.generation_id == dialects.requests[-1].generation_id
