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
    responses         Responses: POST /v1/responses, streamed (cancel and resume in
                      background mode)

A provider is chosen by name from :data:`PROVIDERS` with ``OPENAI_API``, the way a
registry of transports maps a channel's kind to its class.
"""

from __future__ import annotations

from django.conf import settings

from . import profiles
from .base import Provider, StreamEvent, StreamMeta, StreamRequest, uses_demo_model
from .chat_completions import ChatCompletions
from .responses import Responses
from .text import clean_provider_text, mask_key

# OPENAI_API's values: the API each provider speaks.
PROVIDERS: dict[str, type[Provider]] = {
    ChatCompletions.name: ChatCompletions,
    Responses.name: Responses,
}

__all__ = [
    "PROVIDERS", "Provider", "StreamEvent", "StreamMeta", "StreamRequest",
    "api_name", "clean_provider_text", "configured", "forget", "mask_key",
    "uses_demo_model",
]


def api_name() -> str:
    """The key in :data:`PROVIDERS` of the API to speak: ``OPENAI_API`` when set, else
    by profile: ``responses`` for the ``openai`` profile (``OPENAI_PROVIDER=openai``,
    or ``auto`` with no base URL or api.openai.com: profiles.profile_from_url), ``chat``
    for every other profile and for the built-in demo model. A server's profile found
    only by asking it (vLLM, llama.cpp) is never ``openai``, so this needs no request."""
    chosen = getattr(settings, "OPENAI_API", "")
    if chosen:
        return chosen
    if uses_demo_model():
        return ChatCompletions.name
    profile = settings.OPENAI_PROVIDER
    if profile not in profiles.PROFILES:
        profile = profiles.profile_from_url(settings.OPENAI_BASE_URL or None)
    return Responses.name if profile == "openai" else ChatCompletions.name


def configured() -> tuple[type[Provider], str | None, str]:
    """``(provider class, base_url, api_key)`` of the configured provider: the class
    :func:`api_name` names (a system check refuses an unknown ``OPENAI_API``),
    base_url None for the SDK's default. Local servers (vLLM, Ollama, llama.cpp) accept
    any key, but the SDK wants one: ``"none"`` when unset."""
    cls = PROVIDERS[api_name()]
    return cls, settings.OPENAI_BASE_URL or None, settings.OPENAI_API_KEY or "none"


def forget() -> None:
    """Forget what the providers learned about servers in this process: detected
    profiles and refused parameters (tests; a changed server)."""
    profiles.forget()
