"""Leases of streaming generations, checked by every worker process.

A process running a generation refreshes ``Message.heartbeat_at`` every
``CHAT_TUNING.checkpoint_ms`` (:func:`checkpoint_running`, one UPDATE for all its runs, which
saves their text too). When a process dies (SIGKILL, OOM, a lost machine) its
``streaming`` messages stop being refreshed. Every worker process runs a *sweeper*
that, every ``CHAT_TUNING.sweep_s`` seconds (jittered by +-50% so N workers do not sweep in
lockstep), finishes messages whose lease (``CHAT_TUNING.lease_s``) has expired: status
``interrupted``, the last checkpointed text kept, an estimated UsageRecord, and a
``generation.end`` frame published to the conversation's group so open tabs (on any
process) see the end. A message is thus finished at most
``CHAT_TUNING.lease_s + 1.5 * CHAT_TUNING.sweep_s`` (+ one checkpoint) after its process
died: 23.5 s with the defaults, well inside the 60 s the scale-out issue requires.

daphne does not speak the ASGI lifespan protocol, so there is no start-up hook: the
sweeper is started lazily, once per event loop (a service of the loop's Runtime), by
:func:`ensure_sweeper`, called from the WebSocket consumer's ``connect`` and from
``start_generation``; the checkpointer likewise by :func:`ensure_checkpointer`.

The same per-loop task also answers ``worker.stats`` requests on the channel-layer
group ``chat.workers`` (used by ``bench.load`` to count tasks left in each worker).

Runs another worker handed over, or left behind with a resume point when it died, are
continued here (chat.generation.handover, chat.generation.takeover): by every sweep,
before it interrupts what expired, when the sweeper starts, and at once when a
``generation.handover`` notice comes on ``chat.workers``.
"""

from __future__ import annotations

import asyncio
import logging
import random

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings

from . import admission, frames, handover, store, takeover
from .frames import WORKERS_GROUP
from .runtime import Runtime
from .store import Checkpoint, checkpoint_many, finish_expired

logger = logging.getLogger(__name__)

__all__ = [
    "WORKERS_GROUP", "Checkpoint", "checkpoint_many", "checkpoint_running", "ensure_checkpointer",
    "ensure_sweeper", "finish_expired", "pick_up", "running_here", "sweep_once", "worker_stats",
]


# --- checkpoints (the lease's heartbeat) -----------------------------------------------
def running_here() -> list:
    """Generations of this process streaming on the current event loop."""
    return Runtime.current().running()


async def checkpoint_running() -> set[str]:
    """Checkpoint every generation running on this loop (see store.checkpoint_many):
    the text of those that received some since their last checkpoint, the heartbeat
    of all of them.

    A run whose lease was lost is cancelled: it was declared dead and accounted for, so
    it must not keep streaming (and paying) unseen. A run whose text cannot be saved
    is ended as failed (its end keeps the last text that could be saved). A run that
    began finishing while the statement ran is neither: its own end is saved anyway.
    Returns the ids of the runs whose lease was lost."""
    running = running_here()
    if not running:
        return set()
    # A run whose text and reasoning lists have not grown since its last saved
    # checkpoint (Generation.checkpoint_mark; both only ever grow) needs its heartbeat
    # only, not its whole text written again. Kept on the run, so each loop's
    # checkpointer sees only its own runs' marks.
    marks = {g.message_id: (len(g.text), len(g.reasoning)) for g in running}
    changed = [g for g in running if g.checkpoint_mark != marks[g.message_id]]
    # The text and where each answer goes on after it, read in the same step.
    contents, reasonings, points = {}, {}, {}
    for g in changed:
        text, reasoning, point = handover.checkpoint_of(g)
        contents[g.message_id] = text
        if reasoning:
            reasonings[g.message_id] = reasoning
        if point is not None:
            points[g.message_id] = point
    if points and not (await Runtime.current().provider()).can_resume:
        points = {}
    try:
        result = await database_sync_to_async(checkpoint_many, thread_sensitive=False)(
            contents, reasonings, heartbeats=list(marks), resume_points=points)
    except BaseException:
        # What was saved is unknown: write every text again next time.
        for generation in running:
            generation.checkpoint_mark = None
        raise
    for generation in changed:
        saved = generation.message_id not in result.lost | result.unsaved
        generation.checkpoint_mark = marks[generation.message_id] if saved else None
    lost = set()
    for generation in running:
        if not generation.is_streaming():
            continue
        if generation.message_id in result.lost:
            lost.add(generation.message_id)
            logger.warning("generation %s lost its lease; stopping it", generation.message_id)
            generation.cancel("lease_lost")
        elif generation.message_id in result.unsaved:
            generation.fail("The answer could not be saved: the database refused its text.")
    return lost


async def _checkpoint_forever() -> None:
    # Runs while upstream is silent too: the lease must stay fresh (finish_stale).
    while True:
        await asyncio.sleep(settings.CHAT_TUNING.checkpoint_ms / 1000)
        try:
            await checkpoint_running()
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the next interval tries again
            logger.exception("checkpoint failed")


def ensure_checkpointer() -> asyncio.Task:
    """Start this event loop's checkpointer unless it runs already."""
    return Runtime.current().ensure_service("lease-checkpointer", _checkpoint_forever)


# --- the sweeper -------------------------------------------------------------------------
async def sweep_once(layer=None) -> list[dict]:
    """Continue here the runs waiting for a worker (:func:`pick_up`), then run
    store.finish_expired in a thread and publish its frames to the groups of the
    conversations concerned. Returns the ``generation.end`` frames published."""
    await pick_up(layer)
    finished = await database_sync_to_async(finish_expired, thread_sensitive=False)()
    for conversation_id, frame in finished:
        try:
            await Runtime.current().fanout.publish(
                conversation_id, frame, layer or get_channel_layer()
            )
        except Exception:  # noqa: BLE001 - the row is final; a lost frame is repaired by sync
            logger.exception("could not publish the end of %s", frame["message_id"])
    return [frame for _, frame in finished]


async def pick_up(layer=None) -> list:
    """Claim and continue on this loop the runs handed over by a worker that went away
    and those of a dead worker with a resume point (takeover.pick_up); returns the
    Generations started. Never raises (a failure is logged; the next sweep retries)."""
    try:
        started = await takeover.pick_up(layer or get_channel_layer())
    except Exception:  # noqa: BLE001
        logger.exception("picking up runs handed over failed")
        return []
    if started:
        ensure_checkpointer()
    return started


def worker_stats(stacks: bool = False) -> dict:
    """What this process runs now: ``{"worker", "generations", "generation_tasks",
    "tasks", "admission"}`` (counts of running Generation objects, live
    ``generation-*`` asyncio tasks, and all asyncio tasks of the loop; admission.stats:
    the event-loop lag in ms and whether new runs are refused); with ``stacks``, also
    ``"stacks"``: the innermost frames of each live generation task (to diagnose a stuck run)."""
    tasks = asyncio.all_tasks()
    live = [t for t in tasks if t.get_name().startswith("generation-") and not t.done()]
    stats = {
        "worker": store.WORKER_ID,
        "generations": Runtime.current().count(),
        "generation_tasks": len(live),
        "tasks": len(tasks),
        "admission": admission.stats(),
    }
    if stacks:
        stats["stacks"] = {
            t.get_name(): [f"{f.f_code.co_filename}:{f.f_lineno} {f.f_code.co_name}"
                           for f in t.get_stack(limit=30)]
            for t in live
        }
    return stats


async def _sweep_forever(layer) -> None:
    interval = float(settings.CHAT_TUNING.sweep_s)
    await pick_up(layer)  # a worker that starts takes over what waits at once
    while True:
        await asyncio.sleep(interval * random.uniform(0.5, 1.5))
        try:
            await sweep_once(layer)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a database hiccup must not end the sweeper
            logger.exception("lease sweep failed")


async def _answer_stats(layer) -> None:
    # Default prefix: channels-redis polls one list per prefix (see Generation.launch).
    channel = await layer.new_channel()
    await layer.group_add(WORKERS_GROUP, channel)
    try:
        while True:
            message = await layer.receive(channel)
            if message.get("type") == "worker.stats" and message.get("reply_channel"):
                stats = worker_stats(bool(message.get("stacks")))
                await layer.send(message["reply_channel"], frames.stats_reply(stats))
            elif message.get("type") == "generation.handover":
                # Its own task: this listener must not wait on the database.
                Runtime.current().spawn(pick_up(layer), name="handover-pick-up")
    finally:
        try:
            await layer.group_discard(WORKERS_GROUP, channel)
        except Exception:  # noqa: BLE001
            pass


async def _supervise(layer) -> None:
    """Run the sweeper and the stats listener; restart a listener that fails (Redis
    restarting) after a pause, so neither dies for good."""

    async def keep(coro_fn, name):
        while True:
            try:
                await coro_fn(layer)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001
                logger.exception("%s failed; restarting in 1 s", name)
                await asyncio.sleep(1)

    await asyncio.gather(keep(_sweep_forever, "lease sweeper"), keep(_answer_stats, "stats"))


def ensure_sweeper(layer=None) -> asyncio.Task | None:
    """Start this event loop's sweeper unless it runs already (cheap; call it freely).

    Returns the task, or None when ``CHAT_TUNING.sweep_s`` is 0 (sweeping disabled).
    """
    if not settings.CHAT_TUNING.sweep_s:
        return None
    return Runtime.current().ensure_service(
        "lease-sweeper", lambda: _supervise(layer or get_channel_layer())
    )
