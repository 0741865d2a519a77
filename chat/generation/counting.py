"""Counts of a run that come from the provider after its stream: the server's own
tokenizer (``Provider.count_tokens``, source ``tokenized``) and the provider's record
of the answer (``Provider.usage_after``, e.g. OpenRouter's native tokens and cost,
source ``reported``). Both are asked only once the upstream stream is closed, so they
never delay a stop reaching the provider.
"""

from __future__ import annotations

import asyncio
import logging

from channels.db import database_sync_to_async
from django.conf import settings

from .. import accounting
from . import metering
from .providers import Provider, StreamMeta

logger = logging.getLogger(__name__)


async def tokenized_usage(
    provider: Provider, meta: StreamMeta, *, model: str, prompt: list[dict], content: str,
    reasoning: str,
) -> dict | None:
    """``{"prompt_tokens", "completion_tokens"}`` counted by the provider's own
    tokenizer (``provider.count_tokens``: llama.cpp / vLLM ``POST /tokenize``), or None
    when the provider has no tokenizer for this server, a call fails or all of them
    together take longer than ``CHAT_TUNING.tokenize_timeout_s`` (then the run is
    estimated).

    ``completion_tokens`` is the saved answer's count plus the saved reasoning's (each
    tokenized alone, as the engine generated them as separate parts);
    ``prompt_tokens`` the messages' contents with the per-message overhead of
    chat.accounting (the server's chat template is not known here).
    """
    async def count(text: str) -> int | None:
        return await provider.count_tokens(meta, model, text) if text else 0

    texts = [content, reasoning, "\n".join(m.get("content") or "" for m in prompt)]
    try:
        async with asyncio.timeout(settings.CHAT_TUNING.tokenize_timeout_s):
            answer, thought, asked = await asyncio.gather(*(count(t) for t in texts))
    except (TimeoutError, Exception):  # noqa: BLE001 - a count we cannot get is estimated
        logger.info("tokenize failed for %s; usage estimated", meta.profile, exc_info=True)
        return None
    if answer is None or thought is None or asked is None:
        return None
    overhead = accounting.count_prompt_tokens([{"content": ""} for _ in prompt])
    return {"prompt_tokens": asked + overhead, "completion_tokens": answer + thought}


async def lookup_usage(provider: Provider, meta: StreamMeta, message_id: str) -> bool:
    """Ask the provider for its record of the answer (``provider.usage_after``; start
    it only when ``provider.wants_usage_after(meta)``) until it has one, then
    replace the run's counts and cost by it (metering.apply_lookup, source
    ``reported``). OpenRouter publishes a record a few seconds after the end, so the
    lookup is retried with a doubling delay from ``CHAT_TUNING.usage_lookup_first_delay_s`` for
    ``CHAT_TUNING.usage_lookup_window_s`` in all. Returns whether the record was updated.
    Run it as a background task of the Runtime (Runtime.spawn), which cancels it at
    shutdown."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.CHAT_TUNING.usage_lookup_window_s
    delay = settings.CHAT_TUNING.usage_lookup_first_delay_s
    while True:
        await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
        try:
            usage = await provider.usage_after(meta)
        except Exception:  # noqa: BLE001 - a failed lookup is retried like a missing one
            logger.info("generation lookup of %s failed", message_id, exc_info=True)
            usage = None
        if usage is not None:
            apply = database_sync_to_async(metering.apply_lookup, thread_sensitive=False)
            return await apply(message_id, usage) is not None
        if loop.time() >= deadline:
            logger.warning("no provider record of generation %s after %g s; its usage "
                           "stays as counted", message_id,
                           settings.CHAT_TUNING.usage_lookup_window_s)
            return False
        delay *= 2
