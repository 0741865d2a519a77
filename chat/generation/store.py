"""The transactions of a run: start (prepare), end (finalize), the sweep of runs whose
process died, and the checkpoints. Synchronous (call them through
``database_sync_to_async``); no asyncio, no channel layer.

Every transaction that changes a run locks the conversation row first
(``Conversation.objects.lock``), then its messages: one order, so PostgreSQL cannot
deadlock two of them, and a run is finished exactly once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from ..models import Conversation, Message, UsageRecord
from . import budgets, checkpoints, frames, metering
from .autostop import AutoStop, conversation_fields
from .errors import Busy, Forbidden, InvalidRequest
from .outcome import Outcome
from .prompt import counted_prompt, prompt_for_estimate

if TYPE_CHECKING:
    from .startqueue import StartBatch

logger = logging.getLogger(__name__)

# Identifies this process in Message.worker (host:pid:random, unique across restarts).
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"

STALE_ERROR = "The server process running this generation stopped responding."


@dataclass(frozen=True)
class RunRef:
    """What finalize needs to know of a run besides its outcome: ids, the model it was
    priced at, the prompt its tokens are estimated from (None: none) and the
    max_tokens it asked for (None: unknown; the admin report's tokens saved)."""

    message_id: str
    conversation_id: str
    user_id: int
    model: str
    prompt: list[dict] | None
    max_tokens: int | None = None


@dataclass
class PreparedRun:
    """What a prepare function saved and what the upstream request needs: dict shapes
    are ``Conversation.to_dict()`` / ``Message.to_dict()``; ``max_tokens`` in tokens."""

    user_id: int
    conversation: dict
    user_message: dict | None
    assistant_message: dict
    model: str
    prompt: list[dict]
    max_tokens: int
    # generation.end frames of stale runs of this conversation finished on the way.
    stale_ends: list[dict] = field(default_factory=list)
    # autostop hook: the run's automatic stops (repetition guard, cost ceiling).
    autostop: AutoStop = field(default_factory=AutoStop)

    @property
    def ref(self) -> RunRef:
        return RunRef(self.assistant_message["id"], self.conversation["id"], self.user_id,
                      self.model, self.prompt, self.max_tokens)


# --- start -----------------------------------------------------------------------------
def validate_model(model: str | None) -> str:
    """The model to use: ``model`` if allowed (``settings.CHAT_MODELS``), the default
    when empty. Raises InvalidRequest for a model the server does not allow."""
    if not model:
        return settings.CHAT_MODEL
    if model not in settings.CHAT_MODELS:
        raise InvalidRequest(f"Model {model!r} is not available here.")
    return model


def _lock_conversation(user, conversation_id, *, create: dict | None, now=None,
                       batch: StartBatch | None = None) -> tuple[Conversation | None, bool]:
    """``(conversation, created)``: the conversation row, locked for this transaction,
    and whether this call created it. When it does not exist and ``create`` is given
    (``{"model", "system_prompt"}``, and ``title_text``: the text its title comes from),
    it is created for ``user`` with its title and ``updated_at`` (``now``) already set,
    so the start needs no UPDATE of it. In a ``batch`` the row was locked with the
    batch's, and a new one is returned unsaved (the batch inserts it with its messages).
    Raises Forbidden for another user's conversation, Busy for one a start of the same
    batch creates."""
    if batch is not None:
        conversation = batch.existing.get(str(conversation_id))
        creating = batch.created.get(str(conversation_id))
        if creating is not None:
            if creating.owner_id != user.id:
                raise Forbidden("This conversation belongs to someone else.")
            raise Busy("A generation is already running in this conversation.")
    else:
        conversation = Conversation.objects.lock(conversation_id)
    created = False
    if conversation is None and create is not None:
        conversation = _new_conversation(user, conversation_id, create, now or timezone.now())
        created = True
        if batch is None:
            try:
                with transaction.atomic():  # a savepoint: the insert may lose a race
                    conversation.save(force_insert=True)
            except IntegrityError:
                # Another tab created it first; wait for its transaction and use its row.
                conversation = Conversation.objects.select_for_update().get(id=conversation_id)
                created = False
    if conversation is not None and conversation.owner_id != user.id:
        raise Forbidden("This conversation belongs to someone else.")
    return conversation, created


def _new_conversation(user, conversation_id, create: dict, now) -> Conversation:
    """The conversation a first message creates (unsaved); see _lock_conversation."""
    return Conversation(
        id=conversation_id,
        owner=user,
        model=validate_model(create.get("model")),
        system_prompt=(create.get("system_prompt") or "").strip(),
        title=Conversation.title_from(create.get("title_text") or ""),
        created_at=now,
        updated_at=now,
        **conversation_fields(create),  # autostop hook
    )


def _refuse_other_settings(conversation: Conversation, create: dict | None) -> None:
    """A message to an existing conversation may repeat its ``model`` and
    ``system_prompt`` but not change them: they are set when the conversation is created
    and changed with ``PATCH /api/conversations/{id}/``, so a different one would be
    silently ignored. Raises InvalidRequest then; an empty or absent value is no
    request and passes."""
    create = create or {}
    model = create.get("model")
    if model and model != (conversation.model or settings.CHAT_MODEL):
        raise InvalidRequest(
            f"This conversation uses the model {conversation.model or settings.CHAT_MODEL!r}; "
            "change it in the conversation's settings, not with a message.")
    prompt = (create.get("system_prompt") or "").strip()
    if prompt and prompt != conversation.system_prompt.strip():
        raise InvalidRequest(
            "This conversation has another system prompt; change it in the "
            "conversation's settings, not with a message.")


def _supersede_answers_of_last_user_message(conversation: Conversation, *,
                                            itself: bool = False) -> Message:
    """Mark what follows the last visible user message as superseded (and the message
    itself too with ``itself``: an edit replaces it), in one UPDATE; returns it.
    Raises InvalidRequest when there is none."""
    visible = conversation.messages.visible()
    last_user = visible.filter(role=Message.Role.USER).order_by("-created_at").first()
    if last_user is None:
        raise InvalidRequest("There is no user message to answer again.")
    after = Q(created_at__gt=last_user.created_at)
    visible.filter(after | Q(id=last_user.id) if itself else after).update(superseded=True)
    if itself:
        last_user.superseded = True
    return last_user


def _finish_stale_or_refuse(conversation: Conversation, streaming: list | None = None
                            ) -> list[dict]:
    """Finish the conversation's stale runs (finish_stale) and raise Busy when one of
    its runs is still streaming. One query when none streams (the usual case) instead
    of one for the stale runs and one for the busy check; none when ``streaming`` (the
    heartbeats of its streaming messages) was read with a batch's."""
    if streaming is None:
        streaming = list(conversation.messages.streaming()
                         .values_list("heartbeat_at", flat=True))
    if not streaming:
        return []
    cutoff = timezone.now() - timezone.timedelta(seconds=settings.CHAT_TUNING.lease_s)
    # The same test as MessageQuerySet.stale: no heartbeat, or one older than the lease.
    stale_ends = (finish_stale(conversation_id=conversation.id)
                  if any(beat is None or beat < cutoff for beat in streaming) else [])
    if any(beat is not None and beat >= cutoff for beat in streaming):
        raise Busy("A generation is already running in this conversation.")
    return stale_ends


def _no_usage_yet(message: Message) -> Message:
    """Tell the ORM a message just inserted has no UsageRecord, so its to_dict does not
    query for one (a reverse one-to-one is otherwise looked up on every access)."""
    Message.usage.related.set_cached_value(message, None)
    return message


def _prepare(user, conversation_id, *, create: dict | None, ask, ask_writes: bool = True,
             batch: StartBatch | None = None) -> PreparedRun:
    """The transaction every mode shares: lock the user and read their budget, lock (or
    create) the conversation, finish its stale runs, refuse a busy one, let
    ``ask(conversation, now)`` do what the user asked (returns ``(user_message or
    None, text the title comes from)``: the user message *unsaved*; ``ask_writes``:
    whether it writes, superseding messages), check the budget
    and insert it with the streaming assistant row. Nothing is saved if it raises. In a
    ``batch`` (a savepoint of startqueue.prepare_batch) the user's lock, budget and
    running answers come from the batch, which inserts the rows of all its starts.
    The user is locked before the conversation in every start: one order, so
    PostgreSQL cannot deadlock two starts.

    Statements on a new conversation: lock the user with their budget, count their
    running answers, lock the conversation, savepoint + insert + release, insert both
    messages; on an existing one, the streaming check, the history and the
    conversation's update too. In a batch, the batch locks users and conversations,
    reads their running answers and histories, and inserts and updates rows for all its
    starts, so a message sends no statement of its own; a regenerate, an edit, or a
    start that finds stale runs to finish writes in a savepoint of its own. Each
    statement lengthens the queue of starts (SQLite runs one writing transaction at a
    time; docs/performance.md, "Bursts of starts").
    """
    now = timezone.now()
    key = str(conversation_id)
    # In a batch, a start that writes nothing before batch.add (the batch inserts and
    # updates its rows) needs no savepoint of its own to be refused.
    writes = batch is None or (key in batch.existing and (ask_writes or bool(
        batch.streaming.get(key))))
    with transaction.atomic() if writes else contextlib.nullcontext():
        # One query locks the user (budgets.check's serialisation) and reads the budget.
        budget = batch.budget_of(user) if batch else budgets.lock_user(user)
        conversation, created = _lock_conversation(user, conversation_id, create=create,
                                                   now=now, batch=batch)
        if conversation is None:
            raise InvalidRequest("This conversation has no messages yet.")
        if not created:
            _refuse_other_settings(conversation, create)
        if batch is not None and key in batch.conversations:
            raise Busy("A generation is already running in this conversation.")
        # Created by this transaction: no messages, no runs, title and updated_at set.
        stale_ends = [] if created else _finish_stale_or_refuse(
            conversation, batch.streaming.get(key, []) if batch else None)
        user_message, title_text = ask(conversation, now)
        if not created:
            if not conversation.title:
                conversation.title = Conversation.title_from(title_text)
            conversation.updated_at = now
            if batch is None:
                conversation.save(update_fields=["title", "updated_at"])
        # The pending user message is the newest of the history (it is not saved yet).
        if created:
            history = []
        elif batch is not None and not writes:
            history = batch.histories.get(key, [])  # read by the batch, before any write
        else:
            history = None  # read now, after this start's own writes
        prompt, prompt_tokens = counted_prompt(
            conversation, pending=user_message.content if user_message else None,
            history=history)
        model = conversation.model or settings.CHAT_MODEL
        # autostop hook: the run's automatic stops; with a ceiling the budget reserves
        # only what the answer may cost before it is stopped.
        stops = AutoStop.for_run(user, conversation, model=model, prompt_tokens=prompt_tokens,
                                 budget=budget)
        # The run's own reservation is stored on its row: later starts count it.
        reservation = budgets.check(
            user, prompt_tokens=prompt_tokens, max_tokens=stops.reserve(settings.CHAT_MAX_TOKENS),
            model=model, budget=budget, now=now,
            prices=stops.ceiling.prices if stops.ceiling else None,
            in_flight=batch.held_of(user) if batch else None)
        assistant = Message(
            conversation=conversation, role=Message.Role.ASSISTANT, content="",
            status=Message.Status.STREAMING, model=model, created_at=timezone.now(),
            heartbeat_at=now, worker=WORKER_ID, reserved_tokens=reservation.tokens,
            reserved_usd=reservation.usd,
        )
        rows = [m for m in (user_message, assistant) if m is not None]
        if batch is not None:
            # Inserted with the batch's rows (the conversation too, when it is new).
            batch.add(user, conversation, reservation, rows, created=created)
        else:
            Message.objects.bulk_create(rows)
    return PreparedRun(
        user_id=user.id,
        conversation=conversation.to_dict(),
        user_message=user_message.to_dict() if user_message else None,
        assistant_message=_no_usage_yet(assistant).to_dict(),
        model=model,
        prompt=prompt,
        max_tokens=settings.CHAT_MAX_TOKENS,
        stale_ends=stale_ends,
        autostop=stops,  # autostop hook
    )


def _new_user_message(conversation: Conversation, content: str, now) -> Message:
    """The user message a start saves (unsaved: _prepare inserts it)."""
    return Message(
        conversation=conversation, role=Message.Role.USER, content=content,
        status=Message.Status.COMPLETED, created_at=now, completed_at=now,
    )


def prepare_message(user, conversation_id, content: str, create: dict | None, *,
                    batch: StartBatch | None = None) -> PreparedRun:
    """Append ``content`` as a user message (creating the conversation for ``user``
    with ``create`` = ``{"model", "system_prompt"}``, both optional, if it does not
    exist) and start its answer. Raises Forbidden, Busy, InvalidRequest, QuotaExceeded
    or ConcurrencyLimit; then nothing is saved. ``batch``: startqueue.prepare_batch."""
    def ask(conversation, now):
        return _new_user_message(conversation, content, now), content

    return _prepare(user, conversation_id, create={**(create or {}), "title_text": content},
                    ask=ask, ask_writes=False, batch=batch)


def prepare_regenerate(user, conversation_id, *, batch: StartBatch | None = None) -> PreparedRun:
    """Answer the last user message again; the old answer is kept but superseded.
    Raises as prepare_message."""
    def ask(conversation, now):
        return None, _supersede_answers_of_last_user_message(conversation).content

    return _prepare(user, conversation_id, create=None, ask=ask, batch=batch)


def prepare_edit(user, conversation_id, content: str, *, batch: StartBatch | None = None
                 ) -> PreparedRun:
    """Replace the last user message by ``content`` (it and its answer are superseded)
    and answer it. Raises as prepare_message."""
    def ask(conversation, now):
        _supersede_answers_of_last_user_message(conversation, itself=True)
        return _new_user_message(conversation, content, now), content

    return _prepare(user, conversation_id, create=None, ask=ask, batch=batch)


def prepare_run(
    user, conversation_id, content: str | None, mode: str = "message", create: dict | None = None,
    *, batch: StartBatch | None = None,
) -> PreparedRun:
    """One of prepare_message / prepare_regenerate / prepare_edit by ``mode``."""
    if mode == "message":
        return prepare_message(user, conversation_id, content, create, batch=batch)
    if mode == "regenerate":
        return prepare_regenerate(user, conversation_id, batch=batch)
    if mode == "edit":
        return prepare_edit(user, conversation_id, content, batch=batch)
    raise InvalidRequest(f"Unknown mode {mode!r}.")


# --- end -------------------------------------------------------------------------------
def finalize(run: RunRef, outcome: Outcome, content: str | None,
             reasoning: str | None = None) -> UsageRecord:
    """Write the final state of an assistant message and its one UsageRecord.

    The record's counts are the first of ``outcome.usage`` (the provider's final usage,
    source ``reported``), ``outcome.running_usage`` (``running``) and
    ``outcome.tokenized`` (``tokenized``); with none, they are estimated from
    ``run.prompt`` and the saved text plus reasoning (``estimated``). ``content`` /
    ``reasoning`` None keep the text / reasoning saved so far (the last checkpoint):
    the fallback when the text itself cannot be saved. ``outcome.finish_reason`` and
    ``run.max_tokens`` are also kept on the record (the admin report's automatic stops
    and the tokens they saved). Idempotent: a message that already has its record keeps
    it (returned as it is; its ``status`` then tells how it really ended).
    """
    with transaction.atomic():
        Conversation.objects.lock(run.conversation_id)
        message = Message.objects.select_for_update().get(id=run.message_id)
        existing = UsageRecord.objects.filter(message_id=run.message_id).first()
        if existing is not None:
            return existing
        now = timezone.now()
        message.finish(outcome.status, outcome.finish_reason, outcome.error, content, now,
                       reasoning=reasoning)
        record = metering.settle(run, outcome, message)
        Conversation.objects.filter(id=run.conversation_id).update(updated_at=now)
    return record


def finish_stale(conversation_id=None) -> list[dict]:
    """Mark streaming messages whose process stopped heartbeating as ``interrupted``
    (keeping their last checkpointed text) and give each its estimated UsageRecord.

    Returns the ``generation.end`` frames to publish, one per message finished (a
    message its own run finished meanwhile is left as it is and gets none).
    """
    stale = Message.objects.stale().select_related("conversation")
    if conversation_id is not None:
        stale = stale.filter(conversation_id=conversation_id)
    ends = []
    for message in stale:
        conversation = message.conversation
        now = timezone.now()
        ref = RunRef(message.id, conversation.id, conversation.owner_id, message.model,
                     prompt_for_estimate(conversation, before=message.created_at))
        outcome = Outcome(Message.Status.INTERRUPTED, "error", STALE_ERROR,
                          duration_ms=int((now - message.created_at).total_seconds() * 1000))
        # content None: the text of the last checkpoint, read under the row lock.
        record = finalize(ref, outcome, content=None)
        if record.status != Message.Status.INTERRUPTED:
            continue
        ends.append(frames.generation_end(message.id, Message.Status.INTERRUPTED, "error",
                                          record.to_dict(), STALE_ERROR))
        # What is known is the silence, not why: the worker may be alive but stalled
        # (a blocked event loop, a database it cannot reach), or this very process.
        silence = (
            f"no checkpoint for {(now - message.heartbeat_at).total_seconds():.0f} s"
            if message.heartbeat_at else "never checkpointed"
        )
        logger.warning(
            "generation %s interrupted: %s (lease %s s), worker %s%s",
            message.id, silence, settings.CHAT_TUNING.lease_s, message.worker or "unknown",
            " (this process)" if message.worker == WORKER_ID else "",
        )
    return ends


def finish_expired() -> list[tuple[str, dict]]:
    """Finish every streaming message whose lease expired, in any conversation.

    Each conversation is handled in its own transaction holding the conversation row
    lock (the lock the prepare functions take), so two processes sweeping at once, or a
    sweep racing a new message in that conversation, finish a message exactly once and
    publish exactly one ``generation.end`` for it.

    Returns ``[(conversation_id, generation.end frame), ...]``.
    """
    conversation_ids = set(Message.objects.stale().values_list("conversation_id", flat=True))
    finished = []
    for conversation_id in conversation_ids:
        with transaction.atomic():
            if Conversation.objects.lock(conversation_id) is None:
                continue
            for frame in finish_stale(conversation_id=conversation_id):
                finished.append((str(conversation_id), frame))
    return finished


# --- checkpoints (the lease's heartbeat): chat.generation.checkpoints --------------------
# Names callers of this module knew.
Checkpoint = checkpoints.Checkpoint
checkpoint_many = checkpoints.checkpoint_many
