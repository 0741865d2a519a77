"""Continuing a run on another worker: a deploy's graceful shutdown hands its runs over
instead of interrupting them, and a worker that died has its runs picked up from their
last checkpoint. Only for a provider that numbers its events and can stream an answer
again (``Provider.can_resume``: the Responses API in background mode, whose response
keeps generating at the provider without our connection; OpenAI API reference,
"Retrieve a model response", ``stream`` and ``starting_after``).

The resume point of a run is ``(response id, sequence number of the last event read)``
(:func:`resume_point`); it is saved with each checkpoint (chat.generation.checkpoints),
beside the text it goes with.

The worker going away (chat.generation.drain, at the end of its grace):

1. :func:`hand_over` hangs up the run's upstream connection with the cancel reason
   :data:`HANDOVER` (the response is *not* cancelled at the provider:
   chat.generation.counting.cancelled_usage), and the run reads its stream's end as
   after any cut (so text a key mask held back comes out whole);
2. the run's end (task.Generation) calls :func:`leave`: once its last delta is
   published, the text, the resume point and the last seq published are saved and
   the row marked ``handover`` (:func:`save_handover`), still ``streaming``; no usage
   record is written and no ``generation.end`` published: the run is not over;
3. drain sends one :func:`notify` to every worker (channel-layer group
   ``chat.workers``).

The worker taking over (chat.generation.leases: on that notice, and in every sweep)
claims each handed-over row in a transaction holding the conversation's lock, with an
UPDATE that only one worker can win (:func:`claim_handovers`), and continues the run
(chat.generation.takeover): the same message, its seq going on from the last one
published, ``Provider.resume`` from the saved point. A row whose worker died without
handing over and whose lease expired is claimed the same way from its last checkpoint
(:func:`claim_expired`); its seq then jumps (:func:`crash_seq`), so followers ask for
a fresh state instead of trusting positions the dead worker numbered.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

from channels.db import database_sync_to_async
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from .. import accounting
from ..models import Conversation, Message
from . import counting, frames, store
from .autostop import AutoStop
from .counting import HANDOVER
from .errors import GenerationError
from .outcome import SHUTDOWN_ERROR, Outcome
from .prompt import prompt_for_estimate

logger = logging.getLogger(__name__)

__all__ = ["HANDOVER", "Claim", "checkpoint_of", "claim_expired", "claim_handovers",
           "crash_seq", "force",
           "hand_over", "leave", "notify", "resume_point", "save_handover", "waiting"]


def resume_point(generation) -> tuple[str, int] | None:
    """``(response id, last sequence number)`` of a running generation
    (task.Generation) whose provider numbers its events, else None."""
    meta = generation._meta
    if not meta.generation_id or meta.sequence < 0:
        return None
    return meta.generation_id, meta.sequence


def checkpoint_of(generation) -> tuple[str, str, tuple[str, int] | None]:
    """``(text, reasoning, resume point or None)`` for a checkpoint of ``generation``
    (task.Generation): with a resume point, the text is the text of the events up to
    it (``Generation.resume_mark``), so a worker resuming from a crash's last checkpoint
    neither loses text that key masking held back nor repeats any; without one, all the
    text so far."""
    point = resume_point(generation)
    mark = generation.resume_mark
    if point is None or mark is None or mark[0] > point[1]:
        return "".join(generation.text), "".join(generation.reasoning), None
    sequence, text_chunks, reasoning_chunks = mark
    return ("".join(generation.text[:text_chunks]),
            "".join(generation.reasoning[:reasoning_chunks]), (point[0], sequence))


# --- the worker going away -----------------------------------------------------------------
def hand_over(generation) -> bool:
    """Stop reading ``generation`` (task.Generation) here, for another worker to go on:
    its upstream connection is hung up (its response goes on at the provider) and its
    task ends through :func:`leave`. Returns False, doing nothing, for a run without a
    resume point or already ending (cancel it as usual then). The caller knows the
    provider can resume (``Provider.can_resume``)."""
    if resume_point(generation) is None or generation.cancel_reason \
            or not generation.is_streaming():
        return False
    generation.cancel_reason = HANDOVER
    hang_up = generation._meta.hang_up
    if hang_up is not None:
        # The reading task sees the connection end, as after a cut, and ends without a
        # resume (the provider was told it was stopped): what the provider sent before,
        # and text held back for key masking, reaches the run's text first.
        hang_up()
    else:
        generation.task.cancel()
    return True


def force(generation) -> None:
    """Cancel the task of a run handed over whose stream did not end after its hang-up
    (:func:`hand_over`); it still ends through :func:`leave`."""
    if generation.task is not None and not generation.task.done():
        generation.task.cancel()


async def leave(generation, outcome: Outcome) -> Outcome:
    """The end of a run cancelled with :data:`HANDOVER` (called by task.Generation once
    its text is final). Returns ``outcome`` with status ``streaming`` when the run was
    handed over (text, resume point and last seq saved on its row, marked for another
    worker: :func:`save_handover`), its last delta published and its publisher ended;
    the run then ends here without a usage record or a ``generation.end``. Otherwise
    the outcome to save: ``outcome`` itself for a run its provider ended meanwhile
    (completed, or with a final usage), else the run ends as the grace's end does
    (``interrupted``), its response cancelled at the provider and the usage it
    reports recorded."""
    if outcome.status == Message.Status.COMPLETED or outcome.usage is not None:
        return outcome
    point = resume_point(generation)
    if point is not None:
        # Every delta of the text out, so the seq saved is the seq of the text saved.
        generation._flush()
        await generation._outbox.join()
        save = database_sync_to_async(save_handover, thread_sensitive=False)
        try:
            if await save(generation.run.ref, "".join(generation.text),
                          "".join(generation.reasoning), point, generation.seq, generation.tab):
                logger.warning("generation %s handed over at sequence %d (seq %d)",
                               generation.message_id, point[1], generation.seq)
                generation.publish(None)  # its publisher's end
                await generation._publisher_task
                return replace(outcome, status=Message.Status.STREAMING)
        except Exception:  # noqa: BLE001 - then it ends here, as interrupted
            logger.exception("could not hand generation %s over", generation.message_id)
    provider = await generation.runtime.provider()
    usage = None
    if provider.can_cancel and point is not None:
        usage = await counting.confirm_cancel(provider, generation._meta, generation.message_id,
                                              generation.runtime.spawn, generation.wait)
    return replace(outcome, status=Message.Status.INTERRUPTED, finish_reason="error",
                   error=SHUTDOWN_ERROR, usage=usage)


def save_handover(run: store.RunRef, content: str, reasoning: str, point: tuple[str, int],
                  seq: int, tab: str | None) -> bool:
    """Save a run handed over: its text, its resume point ``(response id, sequence
    number)``, and ``handover`` = ``{"seq": last seq published, "tab": the tab that
    started it, "worker": this process}``; its heartbeat refreshed (a start in the
    conversation meanwhile is still ``busy``). Returns False when the row is no longer
    this run's to hand over (final, or handed over already). Synchronous."""
    with transaction.atomic():
        Conversation.objects.lock(run.conversation_id)
        updated = Message.objects.filter(
            id=run.message_id, status=Message.Status.STREAMING, handover__isnull=True,
        ).update(content=content, reasoning=reasoning, response_id=point[0],
                 response_sequence=point[1], heartbeat_at=timezone.now(),
                 handover={"seq": seq, "tab": tab, "worker": store.WORKER_ID})
    return bool(updated)


async def notify(layer) -> None:
    """Tell every worker (group ``chat.workers``) that runs wait to be taken over.
    Never raises: the workers' sweeps find them anyway."""
    try:
        await layer.group_send(frames.WORKERS_GROUP, frames.handover_notice(store.WORKER_ID))
    except Exception:  # noqa: BLE001
        logger.warning("could not announce the runs handed over", exc_info=True)


# --- the worker taking over -----------------------------------------------------------------
@dataclass
class Claim:
    """A run this worker claimed to continue: ``run`` (store.PreparedRun, no user
    message), its text and reasoning so far, ``seq`` (the last seq published, or a jump:
    :func:`crash_seq`), the starting ``tab``, the resume point, and ``elapsed_s`` (s
    since the run began)."""

    run: store.PreparedRun
    content: str
    reasoning: str
    seq: int
    tab: str | None
    response_id: str
    sequence: int
    elapsed_s: float


def crash_seq() -> int:
    """The seq a run picked up after its worker died goes on from: the time in ms, above
    any seq a run (one per delta) could have reached before, so every follower sees a
    gap and asks for a fresh state (chat.generation.sequencer)."""
    return int(time.time() * 1000)


def _handed_over():
    return Message.objects.streaming().filter(handover__isnull=False)


def _expired():
    # Not this process's own: a run of its own whose lease expired (a stalled loop) is
    # still running here; the sweep interrupts it and its next checkpoint stops it.
    return Message.objects.stale().filter(
        handover__isnull=True, response_sequence__isnull=False,
    ).exclude(response_id="").exclude(worker=store.WORKER_ID)


def waiting() -> bool:
    """Whether a run waits to be claimed (:func:`claim_handovers`,
    :func:`claim_expired`): one query. Synchronous."""
    return (_handed_over() | _expired()).exists()


def claim_handovers() -> list[Claim]:
    """Claim every run handed over (:func:`save_handover`) for this process: each in a
    transaction holding its conversation's lock, by an UPDATE of a row still marked,
    so among workers claiming at once exactly one gets each run. Synchronous."""
    return _claim(_handed_over(), lambda row: (row.handover or {}).get("seq"), "handed over by")


def claim_expired() -> list[Claim]:
    """Claim the runs whose lease expired (their worker died) and that have a resume
    point, for this process, before the sweep would interrupt them; their seq jumps
    (:func:`crash_seq`). Synchronous."""
    return _claim(_expired(), lambda row: crash_seq(), "picked up from")


def _claim(rows, seq_of, how: str) -> list[Claim]:
    claims = []
    for message_id, conversation_id in list(rows.values_list("id", "conversation_id")):
        with transaction.atomic():
            conversation = Conversation.objects.lock(conversation_id)
            row = rows.filter(id=message_id).first()  # still to claim, read under the lock
            if conversation is None or row is None:
                continue
            now = timezone.now()
            if not rows.filter(id=message_id).update(handover=None, worker=store.WORKER_ID,
                                                    heartbeat_at=now):
                continue
            claims.append(_claim_of(conversation, row, seq_of(row), now))
        logger.warning("generation %s %s %s at sequence %s", message_id, how,
                       (row.handover or {}).get("worker") or row.worker or "unknown",
                       row.response_sequence)
    return claims


def _claim_of(conversation: Conversation, row: Message, seq: int, now) -> Claim:
    prompt = prompt_for_estimate(conversation, before=row.created_at)
    model = row.model or conversation.model or settings.CHAT_MODEL
    try:
        stops = AutoStop.for_run(conversation.owner_id, conversation, model=model,
                                 prompt_tokens=accounting.count_prompt_tokens(prompt))
        stops.check(row.content, reasoning=row.reasoning)  # the text so far counts
    except GenerationError:
        stops = AutoStop()
    row.heartbeat_at = now
    Message.usage.related.set_cached_value(row, None)  # no record while it streams
    run = store.PreparedRun(
        user_id=conversation.owner_id, conversation=conversation.to_dict(), user_message=None,
        assistant_message=row.to_dict(), model=model, prompt=prompt,
        max_tokens=settings.CHAT_MAX_TOKENS, autostop=stops)
    return Claim(run, row.content, row.reasoning, int(seq or 0), (row.handover or {}).get("tab"),
                 row.response_id, row.response_sequence,
                 max(0.0, (now - row.created_at).total_seconds()))
