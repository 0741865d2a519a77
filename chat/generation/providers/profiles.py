"""Dialect profiles of the Chat Completions provider: what each OpenAI-compatible
server is sent and where its answer's reasoning and usage are read (docs/providers.md
has the table).

``OPENAI_PROVIDER`` picks one (``auto``, the default, or one of :data:`PROFILE_NAMES`).
``auto`` decides from the base URL (no base URL or api.openai.com: ``openai``;
openrouter.ai: ``openrouter``; api.deepseek.com: ``deepseek``; port 11434:
``ollama``), else from the server itself, asked once per base URL and process
(``GET <base>/models``: vLLM lists its models ``owned_by: "vllm"``, llama.cpp's server
``owned_by: "llamacpp"``), else ``generic``.

Besides the profiles: what a server refused once (a 400 naming an optional
parameter, retried without it: :func:`adapt_after`) is remembered per (base URL,
model) for the process, and the two look-ups the accounting makes after a run,
:func:`tokenize` and :func:`lookup_generation`. This module knows nothing of the
stream reader (.chat_completions imports it).
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from urllib.parse import urlsplit

import openai
from django.conf import settings

logger = logging.getLogger(__name__)

# OPENAI_PROVIDER's values besides "auto" (the "generic" profile is auto's fallback).
PROFILE_NAMES = ("openai", "vllm", "ollama", "llamacpp", "openrouter", "deepseek")
PROVIDER_CHOICES = ("auto", *PROFILE_NAMES)
# OpenAI's reasoning models (o1, o3, o4-mini, the gpt-5 family): they reject max_tokens
# and bill reasoning tokens they never stream (OpenAI reasoning guide).
OPENAI_REASONING_MODEL = re.compile(r"^(o1|o3|o4|gpt-5)([-.].*)?$")
# Look-ups after a run (tokenize, generation, the auto-detection probe): at most this
# long (s), never on the hot path of a stream.
LOOKUP_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Profile:
    """One provider's request and reading rules.

    - ``token_limit``: the body key of the answer's token cap: ``max_completion_tokens``
      (OpenAI: its reasoning models answer HTTP 400 to ``max_tokens``) or
      ``max_tokens`` (what every other server here documents);
    - ``stream_options``: sent as is (``include_usage``: the final usage chunk, OpenAI
      API reference; ``continuous_usage_stats``: vLLM's running usage on every chunk);
    - ``reasoning_keys``: the delta keys reasoning text is read from, first found wins;
    - ``tokenize``: the server's tokenizer endpoint dialect (``"llamacpp"``: ``POST
      /tokenize {"content"}``; ``"vllm"``: ``POST /tokenize {"model", "prompt"}``), or "";
    - ``generation_lookup``: OpenRouter's ``GET /api/v1/generation?id=`` gives the exact
      native counts and cost of a generation, stopped ones included.
    """

    name: str
    token_limit: str = "max_tokens"
    stream_options: dict = field(default_factory=lambda: {"include_usage": True})
    reasoning_keys: tuple[str, ...] = ("reasoning_content", "reasoning")
    tokenize: str = ""
    generation_lookup: bool = False

    def hides_reasoning(self, model: str) -> bool:
        """True for a model whose reasoning is billed but not streamed (OpenAI's
        reasoning models): a stopped run's estimate cannot count it."""
        return self.name == "openai" and bool(OPENAI_REASONING_MODEL.match(model))

    def request_body(self, model: str, messages: list[dict], max_tokens: int) -> dict:
        """The completion request's body (the SDK's keyword arguments)."""
        body = {"model": model, "messages": messages, "stream": True,
                self.token_limit: max_tokens}
        if self.stream_options:
            body["stream_options"] = dict(self.stream_options)
        return body


PROFILES = {
    # OpenAI streams no reasoning text in Chat Completions.
    "openai": Profile("openai", token_limit="max_completion_tokens", reasoning_keys=()),
    "vllm": Profile("vllm", stream_options={"include_usage": True,
                                            "continuous_usage_stats": True},
                    reasoning_keys=("reasoning", "reasoning_content"), tokenize="vllm"),
    "ollama": Profile("ollama", reasoning_keys=("reasoning",)),
    "llamacpp": Profile("llamacpp", reasoning_keys=("reasoning_content",),
                        tokenize="llamacpp"),
    "openrouter": Profile("openrouter", reasoning_keys=("reasoning",),
                          generation_lookup=True),
    "deepseek": Profile("deepseek", reasoning_keys=("reasoning_content",)),
    "generic": Profile("generic"),
}
# Owners in GET /v1/models that name the server (vLLM, llama.cpp's llama-server).
_MODEL_OWNERS = {"vllm": "vllm", "llamacpp": "llamacpp"}
_detected: dict[str, str] = {}
# base URL -> the GET /models probe in flight for it.
_probing: dict[str, asyncio.Task] = {}
# (base URL, model) -> body keys the server refused (a 400 naming them).
_refused: dict[tuple[str, str], set[str]] = {}


def base_url_of(client: openai.AsyncOpenAI) -> str:
    """The client's base URL as text, without a trailing slash."""
    return str(client.base_url).rstrip("/")


def profile_from_url(base_url: str | None) -> str | None:
    """The profile a base URL names (None: ask the server). No base URL is OpenAI."""
    if not base_url:
        return "openai"
    parts = urlsplit(base_url)
    host = (parts.hostname or "").lower()
    if host == "api.openai.com":
        return "openai"
    if host == "openrouter.ai" or host.endswith(".openrouter.ai"):
        return "openrouter"
    if host == "api.deepseek.com":
        return "deepseek"
    if parts.port == 11434:  # Ollama's port
        return "ollama"
    return None


async def resolve(client: openai.AsyncOpenAI) -> Profile:
    """The profile of ``client``'s server: OPENAI_PROVIDER, or (``auto``) detected from
    the base URL, else from ``GET <base>/models`` once per base URL and process (any
    failure: ``generic``, remembered too). Never raises."""
    chosen = settings.OPENAI_PROVIDER
    if chosen in PROFILES:
        return PROFILES[chosen]
    base_url = base_url_of(client)
    name = _detected.get(base_url)
    if name is None:
        name = profile_from_url(base_url) or await _shared_probe(client, base_url)
        _detected[base_url] = name
    return PROFILES[name]


async def _shared_probe(client: openai.AsyncOpenAI, base_url: str) -> str:
    """``_probe``, asked once for all the first runs that want it at the same time (a
    burst of starts on a fresh worker would otherwise send one GET /models each). The
    probe is shielded: a caller that is cancelled does not cancel it for the others."""
    loop = asyncio.get_running_loop()
    probe = _probing.get(base_url)
    if probe is None or probe.get_loop() is not loop:
        probe = loop.create_task(_probe(client), name="provider-probe")
        _probing[base_url] = probe
        probe.add_done_callback(
            lambda done: _probing.pop(base_url, None) if _probing.get(base_url) is done
            else None)
    return await asyncio.shield(probe)


async def _probe(client: openai.AsyncOpenAI) -> str:
    """``vllm`` or ``llamacpp`` when the server's model list says so, else ``generic``."""
    try:
        async with asyncio.timeout(LOOKUP_TIMEOUT_S):
            listing = await client.with_options(max_retries=0).get("/models", cast_to=object)
    except Exception as exc:  # a server without /models is still a server
        logger.info("provider auto-detection: GET /models failed (%s)", type(exc).__name__)
        return "generic"
    models = listing.get("data") if isinstance(listing, dict) else None
    for model in models if isinstance(models, list) else ():
        owner = model.get("owned_by") if isinstance(model, dict) else None
        if owner in _MODEL_OWNERS:
            return _MODEL_OWNERS[owner]
    return "generic"


def forget() -> None:
    """Forget detected profiles and refused parameters (tests; a changed server)."""
    _detected.clear()
    _refused.clear()


# --- what a server refused ---------------------------------------------------------------
# Body keys a request can do without (the run's usage is then estimated or tokenized).
OPTIONAL_KEYS = ("stream_options",)


def adapted_body(base_url: str, body: dict) -> dict:
    """``body`` without what this server refused before for this model, and with
    ``max_completion_tokens`` in place of a refused ``max_tokens``."""
    refused = _refused.get((base_url, body.get("model", "")))
    if not refused:
        return body
    body = {k: v for k, v in body.items() if k not in refused or k == "max_tokens"}
    if "max_tokens" in refused and "max_tokens" in body:
        body["max_completion_tokens"] = body.pop("max_tokens")
    return body


def refused_key(exc: openai.APIStatusError, body: dict) -> str | None:
    """The body key an HTTP 400 names that a retry can do without (one of
    :data:`OPTIONAL_KEYS`, or ``max_tokens`` when the server asks for
    ``max_completion_tokens``), or None."""
    if exc.status_code != 400:
        return None
    error = exc.body if isinstance(exc.body, dict) else {}
    error = error.get("error", error) if isinstance(error.get("error"), dict) else error
    param = str(error.get("param") or "")
    text = f"{param} {error.get('message') or ''} {exc.message}"
    for key in OPTIONAL_KEYS:
        if key in body and key in text:
            return key
    if "max_tokens" in body and (param == "max_tokens" or "max_completion_tokens" in text):
        return "max_tokens"
    return None


def adapt_after(base_url: str, exc: openai.APIStatusError, body: dict) -> dict | None:
    """The body to retry with once after ``exc`` (remembered per base URL and model for
    the process), or None when the refusal is not about an optional parameter."""
    key = refused_key(exc, body)
    if key is None:
        return None
    _refused.setdefault((base_url, body.get("model", "")), set()).add(key)
    logger.warning("%s refused %r for model %r; retrying without it (remembered)",
                   base_url, key, body.get("model"))
    return adapted_body(base_url, body)


# --- look-ups after a run ----------------------------------------------------------------
def _server_root(client: openai.AsyncOpenAI) -> str:
    """The server's root URL: llama.cpp and vLLM serve /tokenize there, not under /v1."""
    base = base_url_of(client)
    return base[:-3] if base.endswith("/v1") else base


def _count(value) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10**9:
        return None
    return value


async def tokenize(client: openai.AsyncOpenAI, profile: Profile, model: str,
                   text: str) -> int | None:
    """How many tokens ``text`` is by the server's own tokenizer (llama.cpp: ``POST
    /tokenize {"content"}`` -> ``{"tokens": [...]}``; vLLM: ``POST /tokenize {"model",
    "prompt"}`` -> ``{"count", ...}``), or None: no tokenizer in this profile, or any
    failure (2 s at most). Never raises."""
    if profile.tokenize not in ("llamacpp", "vllm"):
        return None
    payload = ({"content": text} if profile.tokenize == "llamacpp"
               else {"model": model, "prompt": text})
    try:
        async with asyncio.timeout(LOOKUP_TIMEOUT_S):
            answer = await client.with_options(max_retries=0).post(
                f"{_server_root(client)}/tokenize", body=payload, cast_to=object)
    except Exception as exc:
        logger.info("tokenize failed (%s)", type(exc).__name__)
        return None
    if not isinstance(answer, dict):
        return None
    if profile.tokenize == "vllm" and _count(answer.get("count")) is not None:
        return answer["count"]
    tokens = answer.get("tokens")
    return len(tokens) if isinstance(tokens, list) else None


async def lookup_generation(client: openai.AsyncOpenAI, generation_id: str) -> dict | None:
    """OpenRouter's record of a generation (``GET /api/v1/generation?id=``, relative to
    the base URL ``https://openrouter.ai/api/v1``): ``{"prompt_tokens",
    "completion_tokens", "reasoning_tokens", "cached_tokens", "cost_usd"}`` (native
    token counts: the model's own tokenizer; ``cost_usd`` a Decimal, from
    ``total_cost``), counting only what was generated, so a stopped run has its true
    count. None while it answers 404 (it appears shortly after the stream ends), on any
    other failure (2 s at most) or a malformed answer. Never raises."""
    if not generation_id:
        return None
    try:
        async with asyncio.timeout(LOOKUP_TIMEOUT_S):
            answer = await client.with_options(max_retries=0).get(
                "/generation", cast_to=object, options={"params": {"id": generation_id}})
    except openai.NotFoundError:
        return None
    except Exception as exc:
        logger.info("generation lookup failed (%s)", type(exc).__name__)
        return None
    data = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(data, dict):
        return None
    counts = {name: _count(data.get(key)) for name, key in (
        ("prompt_tokens", "native_tokens_prompt"),
        ("completion_tokens", "native_tokens_completion"),
        ("reasoning_tokens", "native_tokens_reasoning"),
        ("cached_tokens", "native_tokens_cached"))}
    if counts["prompt_tokens"] is None or counts["completion_tokens"] is None:
        return None
    counts["reasoning_tokens"] = counts["reasoning_tokens"] or 0
    counts["cached_tokens"] = counts["cached_tokens"] or 0
    try:
        cost = Decimal(str(data.get("total_cost")))
    except InvalidOperation:
        return None
    # UsageRecord.cost_usd holds under 10**6 USD (14 digits, 8 decimals): a larger figure
    # from the provider is not believable and would fail the record's update.
    if not cost.is_finite() or not 0 <= cost < 10**6:
        return None
    return {**counts, "cost_usd": cost}
