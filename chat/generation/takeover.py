"""Continuing here a run another worker handed over or left behind
(chat.generation.handover has the protocol): claim it, rebuild its Generation and
stream the rest of its provider's answer with ``Provider.resume``. Called by the lease
sweeper and on a hand-over notice (chat.generation.leases).
"""

from __future__ import annotations

import logging
import time

from channels.db import database_sync_to_async

from . import handover
from .runtime import Runtime
from .task import Generation

logger = logging.getLogger(__name__)


async def pick_up(layer) -> list[Generation]:
    """Claim the runs waiting for a worker (handed over, or whose worker died with a
    resume point saved) and continue them on this event loop; returns them, launched.
    Nothing when this worker is draining or its provider cannot resume (then a lease
    sweep ends such runs as ``interrupted``). Raises what the database raises."""
    runtime = Runtime.current()
    if runtime.draining or not await database_sync_to_async(
            handover.waiting, thread_sensitive=False)():
        return []
    if not (await runtime.provider()).can_resume:
        return []
    claims = await database_sync_to_async(_claim_all, thread_sensitive=False)()
    started = []
    for claim in claims:
        try:
            started.append(await continue_run(claim, layer))
        except Exception:  # noqa: BLE001 - its lease expires and the sweep ends it
            logger.exception("could not continue generation %s",
                             claim.run.assistant_message["id"])
    return started


def _claim_all() -> list[handover.Claim]:
    return handover.claim_handovers() + handover.claim_expired()


async def continue_run(claim: handover.Claim, layer) -> Generation:
    """Launch the run of ``claim`` on this loop: the text so far as published up to
    ``claim.seq`` (its snapshot), reading the provider's answer after
    ``claim.sequence``. It ends as any run does (one usage record, one
    ``generation.end``). Raises what Generation.launch raises (nothing is left running)."""
    runtime = Runtime.current()
    content = [claim.content] if claim.content else []
    reasoning = [claim.reasoning] if claim.reasoning else []
    generation = Generation(
        run=claim.run, layer=layer, runtime=runtime, tab=claim.tab,
        started_at=time.monotonic() - claim.elapsed_s,
        text=list(content), published_text=list(content),
        reasoning=list(reasoning), published_reasoning=list(reasoning), seq=claim.seq,
        checkpoint_mark=(len(content), len(reasoning)),
        resume_at=(claim.response_id, claim.sequence),
    )
    runtime.add(generation)
    try:
        await generation.launch()
    except BaseException:
        runtime.discard(generation)
        raise
    return generation
