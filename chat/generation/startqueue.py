"""The queue of starts of one event loop: the transactions of starts admitted together
are committed together, a batch at a time (``prepare_batch``).

A start (``service.start_generation``) used to take a thread of the executor and a
transaction of its own; in a burst (hundreds of tabs sending in the same second) the
starts then queued for the threads and, on SQLite, for its one writer, and every one
paid its own commit. Here the starts waiting when a batch begins all go into it (up to
``MAX_BATCH``), in one trip to a thread and one commit, while the next ones gather for
the batch after it; an idle worker still runs a lone start at once. Each start keeps its
own savepoint, so one refused (busy, quota) does not refuse the others, and its own
budget check under its user's row lock (see ``prepare_batch``).

The queue reports each batch (how many starts, how long it took) to its ``on_batch``
callback: admission control (chat.generation.admission) estimates from it how long a
start admitted now will wait.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable
from contextvars import Context
from dataclasses import dataclass

from channels.db import database_sync_to_async
from django.db import DatabaseError, transaction
from django.utils import timezone

from ..models import Conversation, Message
from . import budgets, store
from .prompt import history_of

logger = logging.getLogger(__name__)

# Starts per transaction at most: the first of a batch waits for the whole batch, so a
# batch of this size takes a few hundred ms at most (docs/performance.md, "Bursts of
# starts").
MAX_BATCH = 64


class StartQueue:
    """Starts of one event loop waiting for their transaction (see the module)."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 on_batch: Callable[[int, float], None] | None = None):
        self.loop = loop
        self.on_batch = on_batch
        self._waiting: list[tuple[StartRequest, asyncio.Future]] = []
        self._drainer: asyncio.Task | None = None

    def __len__(self) -> int:
        """Starts waiting for a batch (not those of the batch running)."""
        return len(self._waiting)

    async def submit(self, request: StartRequest) -> store.PreparedRun:
        """Save the start ``request`` (in the next batch) and return its PreparedRun.
        Raises what ``store.prepare_run`` raises for it. A caller cancelled before its
        batch began leaves nothing saved; once it began, its run is saved like the
        others (a run with no task: the lease sweeper ends it, as before)."""
        future = self.loop.create_future()
        self._waiting.append((request, future))
        if self._drainer is None or self._drainer.done():
            # A fresh context: the drainer serves every caller, not its first one.
            self._drainer = self.loop.create_task(self._drain(), name="start-queue",
                                                  context=Context())
        return await future

    async def _drain(self) -> None:
        """Run batches while starts wait; give each start its outcome."""
        batch: list[tuple[StartRequest, asyncio.Future]] = []
        try:
            while self._waiting:
                taken = self._waiting[:MAX_BATCH]
                del self._waiting[:MAX_BATCH]
                batch = [(request, future) for request, future in taken
                         if not future.cancelled()]
                if not batch:
                    continue
                began = self.loop.time()
                try:
                    results = await _prepare_batch([request for request, _ in batch])
                except Exception as exc:  # noqa: BLE001 - each start of it gets the error
                    results = [exc] * len(batch)
                if self.on_batch is not None:
                    self.on_batch(len(batch), self.loop.time() - began)
                for (_, future), result in zip(batch, results, strict=True):
                    if future.cancelled():
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            # Cancelled (the loop is closing): no start is left waiting forever.
            for _, future in batch + self._waiting:
                if not future.done():
                    future.cancel()
            self._waiting.clear()


# --- in a thread of the executor: the transaction of a batch -----------------------------
class StartBatch:
    """What the starts of one batch (:func:`prepare_batch`) share: their users locked
    and their budgets read in one query, their users' running generations counted in
    another, their existing conversations locked in a third, then those conversations'
    streaming messages (``streaming``: heartbeats by conversation id) and histories
    (``histories``: ``[(role, content), ...]`` newest first, as prompt.build_prompt
    reads them) in one query each; at the end their new conversations and messages
    inserted and the existing conversations updated together.

    ``held`` grows with each start of the batch, so a later start of the same user
    counts the earlier ones as running, as it would if their rows were saved already;
    ``conversations`` are those a start of the batch runs in (a second start there is
    refused as busy, as its saved row would make it)."""

    def __init__(self, user_ids, conversation_ids, now):
        self.budgets = budgets.lock_users(user_ids)
        self.held = budgets.held_by_user(user_ids, now)
        # After the users, in the order of their ids: the order every start locks in.
        self.existing: dict[str, Conversation] = {
            str(c.id): c for c in Conversation.objects.select_for_update()
            .filter(id__in=conversation_ids).order_by("id")}
        self.streaming: dict[str, list] = defaultdict(list)
        self.histories: dict[str, list[tuple[str, str]]] = defaultdict(list)
        if self.existing:
            of_existing = Message.objects.filter(conversation_id__in=list(self.existing))
            for conversation_id, beat in of_existing.streaming().values_list(
                    "conversation_id", "heartbeat_at"):
                self.streaming[str(conversation_id)].append(beat)
            for conversation_id, role, content in history_of(of_existing).values_list(
                    "conversation_id", "role", "content"):
                self.histories[str(conversation_id)].append((role, content))
        self.created: dict[str, Conversation] = {}
        self.touched: list[Conversation] = []
        self.conversations: set[str] = set()
        self.rows: list[Message] = []

    def budget_of(self, user):
        return self.budgets.get(user.pk)

    def held_of(self, user) -> budgets.Held:
        return self.held.get(user.pk, budgets.Held())

    def add(self, user, conversation: Conversation, reservation: budgets.Reservation,
            rows: list[Message], *, created: bool = False) -> None:
        """A start of the batch passed its checks: count its run, queue its rows (and
        its conversation when ``created``: not saved yet)."""
        was = self.held_of(user)
        priced = reservation.usd is not None
        self.held[user.pk] = budgets.Held(
            count=was.count + 1, tokens=was.tokens + reservation.tokens,
            usd=was.usd + (reservation.usd if priced else 0),
            unpriced_tokens=was.unpriced_tokens + (0 if priced else reservation.tokens))
        self.conversations.add(str(conversation.id))
        if created:
            self.created[str(conversation.id)] = conversation
        else:
            self.touched.append(conversation)  # its title and updated_at, set in memory
        self.rows.extend(rows)

    def insert(self) -> None:
        """Insert the conversations and messages of every start that passed (a statement
        each). A conversation another process created meanwhile fails the insert (an
        IntegrityError): prepare_batch then runs each start alone."""
        if self.created:
            Conversation.objects.bulk_create(self.created.values())
        if self.rows:
            Message.objects.bulk_create(self.rows)
        if self.touched:
            Conversation.objects.bulk_update(self.touched, ["title", "updated_at"])



@dataclass(frozen=True)
class StartRequest:
    """One start waiting for :func:`prepare_batch`: ``prepare_run``'s arguments."""

    user: object
    conversation_id: object
    content: str | None
    mode: str = "message"
    create: dict | None = None


def prepare_batch(starts: list[StartRequest]) -> list[store.PreparedRun | Exception]:
    """Several starts in ONE transaction: what ``prepare_run`` returns for each, or the
    exception it raised (Forbidden, Busy, InvalidRequest, QuotaExceeded,
    ConcurrencyLimit, a database error), in the order of ``starts``; a refused start
    saves nothing (its savepoint is rolled back) and the others are saved all the same.

    Why: a start's commit (a write-ahead-log sync on SQLite, a round trip on
    PostgreSQL), its trip to a thread, its user's lock, the count of their running
    answers and the insert of its messages are paid once per batch
    (:class:`StartBatch`), and SQLite runs one writing transaction at a time anyway.
    The checks stay exact: every user of the batch is locked (in the order of their
    ids) before any is checked and until the batch commits, so a start of the same user
    in another process waits and then counts these; within the batch each start counts
    the earlier ones of its user (``StartBatch.held``).

    When the batch itself fails (its BEGIN or COMMIT, its final insert: the database
    went away, SQLite busy past its timeout), nothing of it was saved; every start is
    then tried alone, in a transaction of its own, and gets its own outcome.
    """
    order = sorted(range(len(starts)),
                   key=lambda i: (starts[i].user.pk, str(starts[i].conversation_id)))
    results: list[store.PreparedRun | Exception | None] = [None] * len(starts)
    try:
        with transaction.atomic():
            batch = StartBatch({start.user.pk for start in starts},
                               {start.conversation_id for start in starts}, timezone.now())
            for i in order:
                results[i] = _outcome_of(starts[i], batch)
            batch.insert()
    except DatabaseError:
        if len(starts) == 1:
            raise
        logger.warning("a batch of %d starts failed; trying each alone", len(starts),
                       exc_info=True)
        return [_outcome_of(start) for start in starts]
    return results


def _outcome_of(start: StartRequest, batch: StartBatch | None = None
                ) -> store.PreparedRun | Exception:
    """``prepare_run`` of ``start``, or the exception it raised (its savepoint, or its
    own transaction outside a batch, rolled back)."""
    try:
        return store.prepare_run(start.user, start.conversation_id, start.content, start.mode,
                           start.create, batch=batch)
    except Exception as exc:  # noqa: BLE001 - handed to the start's caller
        return exc


_prepare_batch = database_sync_to_async(prepare_batch, thread_sensitive=False)
