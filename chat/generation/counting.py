"""Counts of a run that come from the provider after its stream: the server's own
tokenizer (``Provider.count_tokens``, source ``tokenized``) and the provider's record
of the answer (``Provider.usage_after``, e.g. OpenRouter's native tokens and cost,
source ``reported``), and the usage of an answer the provider cancelled at our request
(``Provider.cancel``: the Responses API in background mode, source ``reported``). All
are asked only once the upstream stream is closed, so they never delay a stop reaching
the provider.
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

# How long (s) a stopped run waits for the provider's confirmed usage of the cancelled
# answer before it ends with its own counts (tokenized or estimated); a later answer
# then corrects the record (apply_late_cancel), as OpenRouter's lookup does.
CANCEL_USAGE_WAIT_S = 1.5
# The cancel reason of a run stopped on this worker to be continued on another
# (Provider.resume): its response must not be cancelled at the provider.
HANDOVER = "handover"


async def tokenized_run(provider: Provider, meta: StreamMeta, generation) -> dict | None:
    """:func:`tokenized_usage` of the text a run (task.Generation) has so far; None if
    cancelled meanwhile."""
    try:
        return await tokenized_usage(
            provider, meta, model=generation.run.model, prompt=generation.run.prompt,
            content="".join(generation.text), reasoning="".join(generation.reasoning))
    except asyncio.CancelledError:
        return None


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




async def cancelled_usage(provider: Provider | None, meta: StreamMeta, generation,
                          ended_by: BaseException | None) -> dict | None:
    """The usage of a run that ended without its provider's end (``ended_by`` not None:
    a stop, a failure) when the provider keeps generating without the connection and
    can cancel (``provider.can_cancel``: the Responses API in background mode): the
    answer is cancelled at the provider (:func:`confirm_cancel`) and the usage it
    reports returned (source ``reported``), else None (then the run is counted as
    before: running, tokenized, estimated). ``generation`` (task.Generation) gives the
    message id, the cancel reason (:data:`HANDOVER`: not cancelled), the Runtime and
    ``wait()``."""
    if ended_by is None or provider is None or not provider.can_cancel \
            or not meta.generation_id or generation.cancel_reason == HANDOVER:
        return None
    return await confirm_cancel(provider, meta, generation.message_id,
                                generation.runtime.spawn, generation.wait)


async def confirm_cancel(provider: Provider, meta: StreamMeta, message_id: str, spawn,
                         recorded) -> dict | None:
    """Cancel the answer ``meta.generation_id`` at the provider (``provider.cancel``)
    and wait for its usage for at most CANCEL_USAGE_WAIT_S: the usage (the provider's
    own figure of what it generated), or None (none reported, or not in time). A usage
    that comes later replaces the run's counts once ``await recorded()`` returns (the
    run's record is written): metering.apply_lookup, source ``reported``. ``spawn`` is
    Runtime.spawn (the cancel outlives the run; cancelled at shutdown)."""
    task = spawn(provider.cancel(meta.generation_id), name=f"cancel-{message_id}")
    try:
        done, _ = await asyncio.wait({task}, timeout=CANCEL_USAGE_WAIT_S)
    except asyncio.CancelledError:  # the worker is stopping
        done = set()
    if task in done:
        return None if task.cancelled() or task.exception() else task.result()
    logger.info("generation %s: no usage of its cancelled answer within %g s; ending it "
                "as counted", message_id, CANCEL_USAGE_WAIT_S)
    spawn(_apply_late_cancel(task, message_id, recorded), name=f"cancel-usage-{message_id}")
    return None


async def _apply_late_cancel(cancel: asyncio.Task, message_id: str, recorded) -> bool:
    try:
        usage = await cancel
    except Exception:  # noqa: BLE001 - Provider.cancel never raises; a bug is logged
        logger.exception("cancel of generation %s failed", message_id)
        return False
    if usage is None:
        return False
    await recorded()
    apply = database_sync_to_async(metering.apply_lookup, thread_sensitive=False)
    return await apply(message_id, usage) is not None
