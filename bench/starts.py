"""Micro-benchmark of the start path: ``N`` store.prepare_message calls (new
conversations, one user each, as bench.throughput's streams) through
``database_sync_to_async(thread_sensitive=False)``, ``C`` at a time, then
store.checkpoint_many of 200 of those runs; prints the statements of one start, and ms
of CPU (this process, all threads) and of wall time per start and per checkpoint.

    SQLITE_PATH=/tmp/starts.sqlite3 python -m bench.starts      # SQLite (migrated here)
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/db python -m bench.starts
    N=300 C=20 DATABASE_CONN_MAX_AGE=0 python -m bench.starts    # other settings

It creates N + 1 users and their conversations in that database: use a scratch one.
Figures: docs/performance.md, "The cost of a start".
"""

from __future__ import annotations

import asyncio
import inspect
import os
import time
import uuid

CHECKPOINT_RUNS = 200
CHECKPOINT_ROUNDS = 20


def statements_per_start(store, user_model) -> tuple[int, int]:
    """Statements of one start on a new conversation, then on that existing one."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from chat.models import Message

    user = user_model.objects.create(username=f"starts-{uuid.uuid4().hex[:10]}")
    with CaptureQueriesContext(connection) as captured:
        run = store.prepare_message(user, uuid.uuid4(), "hello there", {})
    first = len(captured)
    Message.objects.filter(id=run.assistant_message["id"]).update(status="completed")
    with CaptureQueriesContext(connection) as captured:
        store.prepare_message(user, run.conversation["id"], "and again", {})
    return first, len(captured)


async def measure(store, users, concurrency: int) -> None:
    from channels.db import database_sync_to_async

    prepare = database_sync_to_async(store.prepare_message, thread_sensitive=False)
    slots = asyncio.Semaphore(concurrency)

    async def one(user):
        async with slots:
            return await prepare(user, uuid.uuid4(), "hello there, a question", {})

    wall, cpu = time.perf_counter(), time.process_time()
    runs = await asyncio.gather(*(one(user) for user in users))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"starts: {len(users)}, {concurrency} at a time: {cpu / len(users) * 1000:.2f} ms "
          f"CPU per start, {wall / len(users) * 1000:.2f} ms wall per start")

    checkpoint = database_sync_to_async(store.checkpoint_many, thread_sensitive=False)
    ids = [run.assistant_message["id"] for run in runs[:CHECKPOINT_RUNS]]
    texts = {mid: "word " * 300 for mid in ids}
    partial = "heartbeats" in inspect.signature(store.checkpoint_many).parameters
    cases = [("all changed", len(ids))] + ([("a tenth changed", len(ids) // 10)] if partial else [])
    for label, changed in cases:
        wall, cpu = time.perf_counter(), time.process_time()
        for round_ in range(CHECKPOINT_ROUNDS):
            contents = {mid: text + str(round_) for mid, text in list(texts.items())[:changed]}
            if partial:
                await checkpoint(contents, None, heartbeats=ids)
            else:
                await checkpoint(contents)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(f"checkpoint of {len(ids)} runs, {label}: {cpu / CHECKPOINT_ROUNDS * 1000:.1f} ms "
              f"CPU, {wall / CHECKPOINT_ROUNDS * 1000:.1f} ms wall")


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatproject.settings")
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.db import connections

    from chat.generation import store

    count, concurrency = int(os.environ.get("N", "300")), int(os.environ.get("C", "20"))
    call_command("migrate", verbosity=0)
    user_model = get_user_model()
    new, existing = statements_per_start(store, user_model)
    print(f"statements per start, new / existing conversation: {new} / {existing}")
    users = [user_model.objects.create(username=f"starts-{uuid.uuid4().hex[:10]}")
             for _ in range(count)]
    connections.close_all()
    asyncio.run(measure(store, users, concurrency))


if __name__ == "__main__":
    main()
