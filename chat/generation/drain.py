"""Draining a worker that was told to stop (SIGTERM, SIGINT): its runs go on to their
end, nothing new starts, and what still runs after the grace ends as a lost lease does.

The server (chatproject.server.ChatServer) calls :func:`begin` when the signal comes,
closes its sockets (WebSocket 1012, "service restart", RFC 6455 section 7.4.1 and
IANA's registry), then awaits :func:`finish_runs`. Meanwhile:

- admission refuses new generations with reason ``shutting_down`` (chat.generation.admission);
- a socket closed by the server is not the user's disconnect: the consumer cancels
  nothing while :func:`is_draining` (the tab reconnects to another worker and follows
  the run there through the channel layer);
- the runs keep publishing and checkpointing as usual.

A run still streaming when the grace ends is cancelled with reason ``shutdown``: its
upstream stream is closed, its text and usage saved, its status ``interrupted``
(chat.generation.outcome), one ``generation.end`` published: what a lease sweep does
for a dead worker's run, but with the full text.

A run whose provider can stream its answer again (``Provider.can_resume``: the
Responses API in background mode) is handed over instead (chat.generation.handover):
its upstream connection is hung up without cancelling the response, its text and
resume point saved, and another worker, told on the channel layer, continues it to its
end; its tabs, reconnected elsewhere, follow it there.
"""

from __future__ import annotations

import asyncio
import logging

from channels.layers import get_channel_layer

from . import handover
from .runtime import Runtime

logger = logging.getLogger(__name__)

# The cancel reason of a run stopped at the end of the grace (outcome_of: interrupted).
SHUTDOWN = "shutdown"
# How long the runs interrupted at the end of the grace get to save their end (s).
SAVE_TIMEOUT_S = 10.0
# How long a run handed over may read its stream's end after the hang-up before its task
# is cancelled (s): the hang-up ends the read at once unless the loop is very busy.
HANDOVER_READ_S = 1.0


def begin() -> None:
    """Mark this event loop's worker as draining (idempotent)."""
    runtime = Runtime.current()
    if not runtime.draining:
        runtime.draining = True
        logger.warning("draining: %d generations running, no new ones admitted",
                       runtime.count())


def is_draining() -> bool:
    """True once :func:`begin` was called on this event loop."""
    return Runtime.current().draining


async def finish_runs(grace_s: float, now: asyncio.Event | None = None) -> dict:
    """Wait until every generation of this loop has ended, at most ``grace_s`` seconds
    (or until ``now`` is set: a second signal); then hand over those left whose
    provider can resume them (chat.generation.handover) and interrupt the others
    (reason ``shutdown``), and wait up to ``SAVE_TIMEOUT_S`` for their ends to be saved
    and published. Returns ``{"ended": n, "interrupted": n, "handed_over": n}`` (runs
    that ended by themselves during the wait, runs interrupted, runs handed over)."""
    runtime = Runtime.current()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace_s
    before = runtime.count()
    while runtime.count() and loop.time() < deadline and not (now and now.is_set()):
        # Polled: runs end on their own tasks; a tenth of a second is nothing to a deploy.
        await asyncio.sleep(0.1)
    left = runtime.generations()
    resumable = bool(left) and (await runtime.provider()).can_resume
    handed = [g for g in left if resumable and handover.hand_over(g)]
    interrupted = sum(g.cancel(SHUTDOWN) for g in left if not any(g is h for h in handed))
    if left:
        logger.warning("drain: grace over, handing over %d generations, interrupting %d",
                       len(handed), interrupted)
        if handed:
            await _wait(handed, HANDOVER_READ_S)
            for generation in handed:
                handover.force(generation)
        await _wait(left, SAVE_TIMEOUT_S)
    if handed:
        await handover.notify(handed[0].layer or get_channel_layer())
    return {"ended": before - len(left), "interrupted": interrupted, "handed_over": len(handed)}


async def _wait(generations: list, timeout_s: float) -> None:
    """Wait for the ends of ``generations`` to be saved and published, at most
    ``timeout_s`` seconds."""
    waits = [asyncio.ensure_future(g.wait()) for g in generations]
    _, pending = await asyncio.wait(waits, timeout=timeout_s)
    for waiter in pending:
        waiter.cancel()
