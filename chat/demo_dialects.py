"""The loopback upstream's dialect knob (chat.demo_model.UpstreamServer.dialect): the
wire format of one real provider, from its documentation, for tests/test_providers.py
and the accounting tests. ``None`` is the OpenAI reference format the demo has always
spoken (no reasoning, usage ``{"prompt_tokens", "completion_tokens", "total_tokens"}``
only with ``stream_options.include_usage``).

Sources: OpenAI API reference "Create chat completion" (streaming, the usage object's
``completion_tokens_details`` / ``prompt_tokens_details``, the reasoning guide: o-series
and gpt-5 take ``max_completion_tokens`` and hide their reasoning); vLLM docs
"OpenAI-Compatible Server" (``stream_options.continuous_usage_stats``, the tokenizer
API ``POST /tokenize``) and "Reasoning Outputs" (``delta.reasoning``); DeepSeek API
docs "Reasoning Model" (``delta.reasoning_content``) and "Context Caching"
(``prompt_cache_hit_tokens``); Ollama "OpenAI compatibility" (``delta.reasoning``,
usage only with include_usage); llama.cpp tools/server README (``reasoning_content``,
``POST /tokenize {"content"}``); OpenRouter "API reference: get a generation"
(``GET /api/v1/generation?id=``, available shortly after the stream ends).
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from dataclasses import dataclass

from .demo_faults import mid_stream_fault

DIALECTS = (
    "openai-reasoning",   # 400 on max_tokens for o1/o3/o4/gpt-5; hidden, billed reasoning
    "vllm",               # delta.reasoning; continuous_usage_stats; POST /tokenize
    "deepseek",           # delta.reasoning_content; prompt_cache_hit_tokens
    "ollama",             # delta.reasoning; usage only with include_usage
    "llamacpp",           # delta.reasoning_content; POST /tokenize {"content"}
    "openrouter",         # delta.reasoning; X-Generation-Id; GET /api/v1/generation
    "no-stream-options",  # 400 naming stream_options when the body has it
    "no-usage",           # ignores include_usage, never sends usage
    "responses",          # also OpenAI's Responses API, /v1/responses (chat.demo_responses)
)
# Where each dialect streams reasoning text (None: it streams none).
REASONING_FIELD = {
    "vllm": "reasoning", "ollama": "reasoning", "openrouter": "reasoning",
    "deepseek": "reasoning_content", "llamacpp": "reasoning_content",
}
# OpenAI's reasoning model families (o1, o3, o4-mini, gpt-5, gpt-5-mini, ...).
OPENAI_REASONING_MODEL = re.compile(r"^(o1|o3|o4|gpt-5)([-.].*)?$")
MAX_TOKENS_ERROR = {
    "message": "Unsupported parameter: 'max_tokens' is not supported with this model. "
               "Use 'max_completion_tokens' instead.",
    "type": "invalid_request_error", "param": "max_tokens", "code": "unsupported_parameter",
}
STREAM_OPTIONS_ERROR = {
    "message": "Unrecognized request argument supplied: stream_options",
    "type": "invalid_request_error", "param": "stream_options", "code": None,
}
# The model context length /tokenize reports (vLLM's max_model_len).
MAX_MODEL_LEN = 8192
_generation_ids = itertools.count(1)


def check_dialect(value: str | None) -> str | None:
    """``value`` if it names a dialect (or is None), else ValueError."""
    if value is not None and value not in DIALECTS:
        raise ValueError(f"unknown dialect {value!r}; one of {DIALECTS}")
    return value


def rejection(dialect: str | None, body: dict) -> dict | None:
    """The OpenAI-style error a dialect answers HTTP 400 with for this request body,
    or None when it accepts it."""
    model = str(body.get("model") or "")
    if (dialect == "openai-reasoning" and "max_tokens" in body
            and OPENAI_REASONING_MODEL.match(model)):
        return MAX_TOKENS_ERROR
    if dialect == "no-stream-options" and "stream_options" in body:
        return STREAM_OPTIONS_ERROR
    return None


def reasoning_words(messages: list[dict], count: int, split) -> list[str]:
    """``count`` token-like pieces of "thinking" about the last user message."""
    question = next((str(m.get("content") or "") for m in reversed(messages)
                     if m.get("role") == "user"), "")
    topic = " ".join(question.split()[:6]) or "the question"
    pieces = split(f"Let me think about {topic}. The user wants a clear answer, so I "
                   f"should explain it step by step and end with a short example. ")
    return list(itertools.islice(itertools.cycle(pieces), count))


@dataclass
class Speaker:
    """How one streamed response of ``dialect`` is written (one per request)."""

    dialect: str | None
    body: dict
    prompt_tokens: int
    cached_tokens: int

    @property
    def reasoning_field(self) -> str | None:
        """The delta key reasoning text is streamed under, None when not streamed."""
        return REASONING_FIELD.get(self.dialect)

    @property
    def reasons(self) -> bool:
        """True when the model spends a reasoning phase (streamed or hidden)."""
        return self.reasoning_field is not None or self.hidden_reasoning

    @property
    def hidden_reasoning(self) -> bool:
        """True for an OpenAI reasoning model: it reasons (billed) but streams none."""
        return (self.dialect == "openai-reasoning"
                and bool(OPENAI_REASONING_MODEL.match(str(self.body.get("model") or ""))))

    @property
    def include_usage(self) -> bool:
        """Whether a final usage chunk (and ``"usage": null`` on the others) is sent."""
        if self.dialect == "no-usage":
            return False
        return bool((self.body.get("stream_options") or {}).get("include_usage"))

    @property
    def continuous(self) -> bool:
        """vLLM's ``continuous_usage_stats``: a running usage on every chunk."""
        options = self.body.get("stream_options") or {}
        return (self.dialect == "vllm" and self.include_usage
                and bool(options.get("continuous_usage_stats")))

    def chunk_id(self, request_id: int) -> str:
        """The chunks' ``id``: OpenRouter's ``gen-...`` (also its X-Generation-Id)."""
        if self.dialect == "openrouter":
            return f"gen-{int(time.time())}-demo{next(_generation_ids)}"
        return f"chatcmpl-demo{request_id}"

    def usage(self, reasoning: int, content: int) -> dict:
        """The usage object of this dialect after ``reasoning`` + ``content`` tokens."""
        completion = reasoning + content
        usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                 "total_tokens": self.prompt_tokens + completion}
        if self.dialect in ("openai-reasoning", "openrouter"):
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens,
                                              "audio_tokens": 0}
            usage["completion_tokens_details"] = {
                "reasoning_tokens": reasoning, "audio_tokens": 0,
                "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
        elif self.dialect == "deepseek":
            usage["prompt_cache_hit_tokens"] = self.cached_tokens
            usage["prompt_cache_miss_tokens"] = self.prompt_tokens - self.cached_tokens
            usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
        if self.dialect == "openrouter":
            usage["cost"] = generation_cost(self.prompt_tokens, completion)
        return usage


def generation_cost(prompt_tokens: int, completion_tokens: int) -> float:
    """The loopback's price of a generation in USD: 1 USD per million prompt tokens
    and 2 per million completion tokens (round figures tests can check)."""
    return round((prompt_tokens * 1 + completion_tokens * 2) / 1_000_000, 9)


def generation_record(record, generation_id: str, model: str, speaker: Speaker) -> dict:
    """OpenRouter's ``GET /api/v1/generation`` answer for a finished request: only what
    was really generated (a stopped run has its true count)."""
    reasoning, content = len(record.reasoning_written), len(record.text_written)
    completion = reasoning + content
    return {"data": {
        "id": generation_id, "model": model, "streamed": True,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tokens_prompt": speaker.prompt_tokens, "tokens_completion": completion,
        "native_tokens_prompt": speaker.prompt_tokens,
        "native_tokens_completion": completion,
        "native_tokens_reasoning": reasoning,
        "native_tokens_cached": speaker.cached_tokens,
        "total_cost": generation_cost(speaker.prompt_tokens, completion),
        "finish_reason": "stop" if record.completed else None,
        "cancelled": record.client_closed_at is not None,
    }}


def extra_route(server, method: str, path: str, query: str, body: bytes, parse):
    """``(status, payload)`` for a dialect's own endpoint, or None: ``POST /tokenize``
    (vLLM: ``{"model", "prompt"}`` -> ``{"count", "tokens", "max_model_len"}``;
    llama.cpp: ``{"content"}`` -> ``{"tokens"}``) and OpenRouter's ``GET
    .../generation?id=`` (404 until ``server.generation_delay`` s after the stream
    ended). ``parse`` decodes the JSON body."""
    dialect = server.dialect
    if method == "GET" and path.endswith("/models") and dialect in ("vllm", "llamacpp"):
        owner = {"vllm": "vllm", "llamacpp": "llamacpp"}[dialect]
        return 200, {"object": "list", "data": [
            {"id": server.model, "object": "model", "owned_by": owner}]}
    if method == "POST" and path == "/tokenize" and dialect in ("vllm", "llamacpp"):
        try:
            request = parse(body or b"{}")
        except ValueError:
            return 400, {"error": {"message": "body is not JSON"}}
        text = request.get("prompt" if dialect == "vllm" else "content")
        if not isinstance(text, str):
            return 400, {"error": {"message": "missing text to tokenize"}}
        ids = [sum(map(ord, piece)) % 50000 for piece in server.split(text)]
        if dialect == "vllm":
            return 200, {"count": len(ids), "tokens": ids, "max_model_len": MAX_MODEL_LEN}
        return 200, {"tokens": ids}
    if method == "GET" and path.endswith("/generation") and dialect == "openrouter":
        wanted = dict(p.partition("=")[::2] for p in query.split("&") if p).get("id", "")
        found = server.generations.get(wanted)
        if found is not None:
            record, speaker, model = found
            ended = record.finished_at or record.client_closed_at
            if ended is not None and time.monotonic() - ended >= server.generation_delay:
                return 200, generation_record(record, wanted, model, speaker)
        return 404, {"error": {"code": 404,
                               "message": f"Generation {wanted} not found"}}
    return None


async def write_tokens(server, record, tokens, chunk, send, finish_reason, speaker) -> str:
    """Write one streamed response: the role chunk, the reasoning phase
    (``server.reasoning_tokens`` pieces, paced like content; hidden ones are billed but
    never sent), the content tokens, finish_reason, the usage chunk and [DONE], with
    ``server.fault`` and ``server.drop_after`` applied. Returns how the response ends
    (``"done"``, ``"dropped"``, ``"closed"``). ``chunk(choices, usage)`` builds an SSE
    event, ``send`` writes one; the caller cancels this on client close, so generation
    stops at the next await."""
    fault = server.fault

    def running(content_tokens: int) -> dict | None:
        # vLLM's continuous_usage_stats: every chunk carries the usage so far.
        if not speaker.continuous:
            return None
        return speaker.usage(len(record.reasoning_written), content_tokens)

    delay = 1.0 / server.tokens_per_second if server.tokens_per_second > 0 else 0
    if fault == "hang_before_headers":
        await asyncio.Event().wait()  # until the server sees the client leave
    if server.response_delay:
        await asyncio.sleep(server.response_delay)
    await send(chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                       "finish_reason": None}], running(0)))
    field_name = speaker.reasoning_field
    thoughts = server.reasoning_tokens if speaker.reasons else 0
    for token in reasoning_words(speaker.body.get("messages") or [], thoughts, server.split):
        if delay:
            await asyncio.sleep(delay)
        record.reasoning_written.append(token)
        if field_name:
            await send(chunk([{"index": 0, "delta": {field_name: token},
                               "finish_reason": None}], running(0)))
    for token in tokens:
        if delay:
            await asyncio.sleep(delay)
        if server.drop_after is not None and record.chunks_written >= server.drop_after:
            return "dropped"
        if record.chunks_written == server.fault_after and fault is not None:
            outcome = await mid_stream_fault(fault, record, chunk, send)
            if outcome:
                return outcome
        await send(chunk([{"index": 0, "delta": {"content": token}, "finish_reason": None}],
                         running(record.chunks_written + 1)))
        record.chunks_written += 1
        record.text_written.append(token)
        if record.first_chunk_at is None:
            record.first_chunk_at = time.monotonic()
    await send(chunk([{"index": 0, "delta": {}, "finish_reason": finish_reason}],
                     running(record.chunks_written)))
    if speaker.include_usage:
        await send(chunk(None if fault == "no_choices" else [],
                         speaker.usage(len(record.reasoning_written), len(tokens))))
    if fault == "no_done_close":
        return "closed"
    if fault == "no_done_hang":
        await asyncio.Event().wait()
    await send("data: [DONE]\n\n")
    return "done"
