"""Leases of streaming generations, checked by every worker process.

A process running a generation refreshes ``Message.heartbeat_at`` every
``CHAT_CHECKPOINT_MS`` (``Generation._heartbeat``). When a process dies (SIGKILL, OOM,
a lost machine) its ``streaming`` messages stop being refreshed. Every worker process
runs a *sweeper* that, every ``CHAT_SWEEP_S`` seconds (jittered by +-50% so N workers do
not sweep in lockstep), finishes messages whose lease (``CHAT_LEASE_S``) has expired:
status ``interrupted``, the last checkpointed text kept, an estimated UsageRecord, and a
``generation.end`` frame published to the conversation's group so open tabs (on any
process) see the end. A message is thus finished at most
``CHAT_LEASE_S + 1.5 * CHAT_SWEEP_S`` (+ one checkpoint) after its process died: 23.5 s
with the defaults, well inside the 60 s the scale-out issue requires.

Checkpoints themselves are written here too (:func:`checkpoint_running`): one UPDATE
per process every ``CHAT_CHECKPOINT_MS`` for all its running generations.

daphne does not speak the ASGI lifespan protocol, so there is no start-up hook: the
sweeper is started lazily, once per event loop, by :func:`ensure_sweeper`, called from
the WebSocket consumer's ``connect`` and from ``start_generation``.

The same per-loop task also answers ``worker.stats`` requests on the channel-layer
group ``chat.workers`` (used by ``bench.load`` to count tasks left in each worker).
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
import weakref
from contextvars import Context
from typing import NamedTuple

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import transaction
from django.db.models import Case, TextField, Value, When
from django.utils import timezone

from . import generation as gen
from .models import Conversation, Message

logger = logging.getLogger(__name__)

# Channel-layer group every worker process listens on for ``worker.stats`` requests.
WORKERS_GROUP = "chat.workers"

# One sweeper and one checkpointer task per event loop (tests run one loop per test;
# daphne one per process).
_sweepers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_checkpointers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# --- checkpoints (the lease's heartbeat) -----------------------------------------------
class Checkpoint(NamedTuple):
    """What :func:`checkpoint_many` found: ``lost``, ids whose row is no longer
    ``streaming`` (a sweeper finished them as ``interrupted`` while this process was too
    slow); ``unsaved``, ids whose text the database refused (their lease was refreshed
    all the same)."""

    lost: set[str]
    unsaved: set[str]


def checkpoint_many(contents: dict[str, str]) -> Checkpoint:
    """Save the text so far of streaming messages and refresh their lease, in ONE
    UPDATE statement: ``{message_id: content}``. Rows already final are left alone.

    One statement per process and interval instead of one per run: with a run per
    UPDATE (each with its connection and commit), checkpoints took a quarter of a
    worker's CPU in bench.load profiles at 100 streams per worker (docs/scale.md).

    One run's text must not fail the others (issue 9: a lone surrogate in one answer
    made every run of the process miss its heartbeats and be swept): when the batch
    fails, each row is written on its own, and a row whose text is refused gets its
    lease refreshed without it and is reported in ``unsaved``. Raises only when even
    that fails (the database itself is unavailable; the next interval tries again).
    """
    if not contents:
        return Checkpoint(set(), set())
    try:
        with transaction.atomic():
            alive = {
                str(mid) for mid in Message.objects.select_for_update().filter(
                    id__in=list(contents), status=Message.Status.STREAMING
                ).values_list("id", flat=True)
            }
            _update_contents({mid: text for mid, text in contents.items() if mid in alive})
        return Checkpoint(set(contents) - alive, set())
    except Exception:  # noqa: BLE001 - any row may be the cause; find it row by row
        logger.warning("batched checkpoint of %d runs failed; saving them one by one",
                       len(contents), exc_info=True)
    lost, unsaved = set(), set()
    for mid, text in contents.items():
        streaming = Message.objects.filter(id=mid, status=Message.Status.STREAMING)
        try:
            with transaction.atomic():
                updated = streaming.update(content=text, heartbeat_at=timezone.now())
        except Exception:  # noqa: BLE001
            # If the heartbeat alone cannot be written either, the database is the
            # problem, not this row: let it raise.
            with transaction.atomic():
                updated = streaming.update(heartbeat_at=timezone.now())
            logger.error("the text of generation %s cannot be saved", mid, exc_info=True)
            unsaved.add(mid)
        if not updated:
            lost.add(mid)
    return Checkpoint(lost, unsaved - lost)


def _update_contents(contents: dict[str, str]) -> None:
    if not contents:
        return
    Message.objects.filter(id__in=list(contents), status=Message.Status.STREAMING).update(
        content=Case(
            *(When(id=uuid.UUID(mid), then=Value(text)) for mid, text in contents.items()),
            output_field=TextField(),
        ),
        heartbeat_at=timezone.now(),
    )


def running_here() -> list:
    """Generations of this process running on the current event loop."""
    loop = asyncio.get_running_loop()
    return [
        g for g in list(gen._running.values())
        if g.task is not None and not g.task.done() and not g._finishing
        and g.task.get_loop() is loop
    ]


async def checkpoint_running() -> set[str]:
    """Checkpoint every generation running on this loop (see :func:`checkpoint_many`).

    A run whose lease was lost is cancelled: it was declared dead and accounted for, so
    it must not keep streaming (and paying) unseen. A run whose text cannot be saved
    is ended as failed (its end keeps the last text that could be saved). A run that
    began finishing while the statement ran is neither: its own end is saved anyway.
    Returns the ids of the runs whose lease was lost."""
    running = running_here()
    contents = {g.message_id: "".join(g.text) for g in running}
    if not contents:
        return set()
    result = await database_sync_to_async(checkpoint_many, thread_sensitive=False)(contents)
    lost = set()
    for generation in running:
        if generation._finishing or generation.task.done():
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
        await asyncio.sleep(settings.CHAT_CHECKPOINT_MS / 1000)
        try:
            await checkpoint_running()
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the next interval tries again
            logger.exception("checkpoint failed")


def ensure_checkpointer() -> asyncio.Task:
    """Start this event loop's checkpointer unless it runs already."""
    loop = asyncio.get_running_loop()
    task = _checkpointers.get(loop)
    if task is None or task.done():
        # A fresh context: this task lives as long as the loop, not as its first caller.
        task = loop.create_task(
            _checkpoint_forever(), name="lease-checkpointer", context=Context()
        )
        _checkpointers[loop] = task
    return task


# --- the sweeper -------------------------------------------------------------------------


def finish_expired() -> list[tuple[str, dict]]:
    """Finish every streaming message whose lease expired, in any conversation.

    Each conversation is handled in its own transaction holding the conversation row
    lock (the lock ``prepare_run`` takes), so two processes sweeping at once, or a sweep
    racing a new message in that conversation, finish a message exactly once and
    publish exactly one ``generation.end`` for it.

    Returns ``[(conversation_id, generation.end frame), ...]``.
    """
    conversation_ids = set(Message.objects.stale().values_list("conversation_id", flat=True))
    finished = []
    for conversation_id in conversation_ids:
        with transaction.atomic():
            locked = list(
                Conversation.objects.select_for_update().filter(id=conversation_id).values("id")
            )
            if not locked:
                continue
            for frame in gen.finish_stale(conversation_id=conversation_id):
                finished.append((str(conversation_id), frame))
    return finished


async def sweep_once(layer=None) -> list[dict]:
    """Run :func:`finish_expired` in a thread and publish its frames to the groups of
    the conversations concerned. Returns the ``generation.end`` frames published."""
    finished = await database_sync_to_async(finish_expired, thread_sensitive=False)()
    layer = layer or get_channel_layer()
    for conversation_id, frame in finished:
        try:
            await layer.group_send(
                gen.group_name(conversation_id), {"type": "chat.frame", "frame": frame}
            )
        except Exception:  # noqa: BLE001 - the row is final; a lost frame is repaired by sync
            logger.exception("could not publish the end of %s", frame["message_id"])
    return [frame for _, frame in finished]


def worker_stats(stacks: bool = False) -> dict:
    """What this process runs now: ``{"worker", "generations", "generation_tasks",
    "tasks"}`` (counts of running Generation objects, live ``generation-*`` asyncio
    tasks, and all asyncio tasks of the loop); with ``stacks``, also ``"stacks"``: the
    innermost frames of each live generation task (to diagnose a stuck run)."""
    tasks = asyncio.all_tasks()
    live = [t for t in tasks if t.get_name().startswith("generation-") and not t.done()]
    stats = {
        "worker": gen.WORKER_ID,
        "generations": len(gen._running),
        "generation_tasks": len(live),
        "tasks": len(tasks),
    }
    if stacks:
        stats["stacks"] = {
            t.get_name(): [f"{f.f_code.co_filename}:{f.f_lineno} {f.f_code.co_name}"
                           for f in t.get_stack(limit=30)]
            for t in live
        }
    return stats


async def _sweep_forever(layer) -> None:
    interval = float(settings.CHAT_SWEEP_S)
    while True:
        await asyncio.sleep(interval * random.uniform(0.5, 1.5))
        try:
            await sweep_once(layer)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a database hiccup must not end the sweeper
            logger.exception("lease sweep failed")


async def _answer_stats(layer) -> None:
    # Default prefix: channels-redis polls one list per prefix (see Generation._launch).
    channel = await layer.new_channel()
    await layer.group_add(WORKERS_GROUP, channel)
    try:
        while True:
            message = await layer.receive(channel)
            if message.get("type") == "worker.stats" and message.get("reply_channel"):
                stats = worker_stats(bool(message.get("stacks")))
                await layer.send(message["reply_channel"], {"type": "worker.stats.reply", **stats})
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

    Returns the task, or None when ``CHAT_SWEEP_S`` is 0 (sweeping disabled).
    """
    if not settings.CHAT_SWEEP_S:
        return None
    loop = asyncio.get_running_loop()
    task = _sweepers.get(loop)
    if task is None or task.done():
        layer = layer or get_channel_layer()
        task = loop.create_task(
            _supervise(layer), name=f"lease-sweeper-{uuid.uuid4().hex[:6]}", context=Context()
        )
        _sweepers[loop] = task
    return task
