"""Checkpoints of streaming runs: their text so far and their lease's heartbeat, for
every run of a process in one statement (chat.generation.leases calls it every
``CHAT_TUNING.checkpoint_ms``). Synchronous (call it through ``database_sync_to_async``).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from typing import NamedTuple

from django.db import transaction
from django.utils import timezone

from ..models import Message

logger = logging.getLogger(__name__)


class Checkpoint(NamedTuple):
    """What :func:`checkpoint_many` found: ``lost``, ids whose row is no longer
    ``streaming`` (a sweeper finished them as ``interrupted`` while this process was too
    slow); ``unsaved``, ids whose text the database refused (their lease was refreshed
    all the same)."""

    lost: set[str]
    unsaved: set[str]


def checkpoint_many(contents: dict[str, str],
                    reasonings: dict[str, str] | None = None,
                    heartbeats: Iterable[str] = (),
                    resume_points: dict[str, tuple[str, int]] | None = None) -> Checkpoint:
    """Save the text so far of streaming messages and refresh their lease, in ONE
    UPDATE statement: ``{message_id: content}``, and ``{message_id: reasoning}`` for
    runs that streamed reasoning (others keep theirs); ``heartbeats``: ids of runs
    whose text has not changed since their last checkpoint, whose lease alone is
    refreshed (their text is not sent again); ``resume_points``: ``{message_id:
    (response id, sequence number)}``, where the provider's answer continues after the
    text saved (chat.generation.handover), for runs in ``contents`` whose provider can
    resume. Rows already final, or handed over to another worker, are left alone.

    One statement per process and interval instead of one per run: with a run per
    UPDATE (each with its connection and commit), checkpoints took a quarter of a
    worker's CPU in bench.load profiles at 100 streams per worker (docs/scale.md).
    The rows it finds still ``streaming`` are the rows it updated; only when fewer
    than asked were updated does a second query tell which (the usual checkpoint is
    one statement, not a locking SELECT and an UPDATE).

    One run's text must not fail the others (a lone surrogate in one answer would make
    every run of the process miss its heartbeats and be swept): when the batch
    fails, each row is written on its own, and a row whose text is refused gets its
    lease refreshed without it and is reported in ``unsaved``. Raises only when even
    that fails (the database itself is unavailable; the next interval tries again).
    """
    reasonings = {mid: text for mid, text in (reasonings or {}).items() if mid in contents}
    points = {mid: point for mid, point in (resume_points or {}).items() if mid in contents}
    ids = list(contents) + [mid for mid in heartbeats if mid not in contents]
    if not ids:
        return Checkpoint(set(), set())
    try:
        with transaction.atomic():
            updated = _update_contents(ids, contents, reasonings, points)
            if updated == len(ids):
                alive = set(ids)
            else:
                # Rows this transaction updated are locked by it, and a final row never
                # becomes streaming again: the streaming ones are the updated ones.
                alive = {str(mid) for mid in Message.objects.filter(
                    id__in=ids, status=Message.Status.STREAMING, handover__isnull=True,
                ).values_list("id", flat=True)}
        return Checkpoint(set(ids) - alive, set())
    except Exception:  # noqa: BLE001 - any row may be the cause; find it row by row
        logger.warning("batched checkpoint of %d runs failed; saving them one by one",
                       len(ids), exc_info=True)
    lost, unsaved = set(), set()
    for mid in ids:
        streaming = Message.objects.filter(id=mid, status=Message.Status.STREAMING,
                                           handover__isnull=True)
        try:
            with transaction.atomic():
                extra = {"reasoning": reasonings[mid]} if mid in reasonings else {}
                if mid in contents:
                    extra["content"] = contents[mid]
                if mid in points:
                    extra["response_id"], extra["response_sequence"] = points[mid]
                updated = streaming.update(heartbeat_at=timezone.now(), **extra)
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


def _update_contents(ids: list[str], contents: dict[str, str],
                     reasonings: dict[str, str],
                     points: dict[str, tuple[str, int]] | None = None) -> int:
    """One UPDATE of the streaming rows of ``ids`` not handed over: heartbeat, the text
    of those in ``contents`` / ``reasonings`` and the resume point of those in
    ``points`` (the others keep theirs). Returns the rows updated.

    Written as SQL, not as the ORM's ``Case(When(...))``: compiling 200 ``When`` lookups
    cost 37 ms of CPU per checkpoint of 200 runs, every CHAT_TUNING.checkpoint_ms, on a worker
    that also streams them (docs/performance.md, "The cost of a start"). Values go
    through the fields' own conversions, so each backend gets what the ORM would send.
    """
    connection = transaction.get_connection()
    quote = connection.ops.quote_name
    meta = Message._meta
    pk = meta.pk

    def key(mid):
        return pk.get_db_prep_value(uuid.UUID(mid), connection)

    params: list = [meta.get_field("heartbeat_at").get_db_prep_value(timezone.now(), connection)]
    assignments = [f"{quote(meta.get_field('heartbeat_at').column)} = %s"]
    points = points or {}
    columns = (("content", contents), ("reasoning", reasonings),
               ("response_id", {mid: point[0] for mid, point in points.items()}),
               ("response_sequence", {mid: point[1] for mid, point in points.items()}))
    for column, texts in columns:
        if texts:
            # A row without a branch keeps its own text (ELSE), not NULL.
            branches = " ".join("WHEN %s THEN %s" for _ in texts)
            assignments.append(f"{quote(column)} = CASE {quote(pk.column)} {branches} "
                               f"ELSE {quote(column)} END")
            for mid, text in texts.items():
                params += [key(mid), text]
    params += [key(mid) for mid in ids]
    params.append(Message.Status.STREAMING.value)
    sql = (f"UPDATE {quote(meta.db_table)} SET {', '.join(assignments)} "
           f"WHERE {quote(pk.column)} IN ({', '.join(['%s'] * len(ids))}) "
           f"AND {quote('status')} = %s AND {quote('handover')} IS NULL")
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.rowcount
