"""The provider layer: the only modules that speak to a model provider (and import its
SDK or an HTTP client). The rest of the generation package sees :class:`Provider`,
:class:`StreamRequest`, :class:`StreamEvent` and :class:`StreamMeta` (.base).

Modules::

    text              untrusted provider text: cleaning, API key masking
    base              the interface (Provider, StreamRequest, StreamEvent, StreamMeta)
    sse_reader        the data of server-sent events from an HTTP response's bytes
    netstream         the HTTP client's sockets read on asyncio (an httpcore2 backend)
    transport         the httpx2 transport on that backend; batch_reads, hang_up
    profiles          the dialects of OpenAI-compatible servers (OPENAI_PROVIDER)
    chat_completions  ChatCompletions: POST /chat/completions, streamed

A provider is chosen by name from :data:`PROVIDERS` with ``OPENAI_API``, the way a
registry of transports maps a channel's kind to its class.
"""

from __future__ import annotations

from django.conf import settings

from . import profiles
from .base import Provider, StreamEvent, StreamMeta, StreamRequest, uses_demo_model
from .chat_completions import ChatCompletions
from .text import clean_provider_text, mask_key

# OPENAI_API's values: the API each provider speaks.
PROVIDERS: dict[str, type[Provider]] = {
    ChatCompletions.name: ChatCompletions,
}

__all__ = [
    "PROVIDERS", "Provider", "StreamEvent", "StreamMeta", "StreamRequest",
    "clean_provider_text", "configured", "forget", "mask_key", "uses_demo_model",
]


def configured() -> tuple[type[Provider], str | None, str]:
    """``(provider class, base_url, api_key)`` of the configured provider: the class
    ``OPENAI_API`` names (a system check refuses an unknown one), base_url None for the
    SDK's default. Local servers (vLLM, Ollama, llama.cpp) accept any key, but the SDK
    wants one: ``"none"`` when unset."""
    cls = PROVIDERS[getattr(settings, "OPENAI_API", ChatCompletions.name)]
    return cls, settings.OPENAI_BASE_URL or None, settings.OPENAI_API_KEY or "none"


def forget() -> None:
    """Forget what the providers learned about servers in this process: detected
    profiles and refused parameters (tests; a changed server)."""
    profiles.forget()
