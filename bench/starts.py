"""Micro-benchmark of the start path, on the database configured as the app's.

1. The statements of one start (store.prepare_message), on a new conversation and on an
   existing one.
2. ``N`` store.prepare_message calls (new conversations, one user each, as
   bench.throughput's streams) through ``database_sync_to_async(thread_sensitive=False)``,
   ``C`` at a time, each in its own transaction; then store.checkpoint_many of 200 of
   those runs.
3. Bursts: ``N`` whole starts submitted in the same instant (service.start_generation:
   admission, the user message saved, the budget checked, the assistant row created,
   the run launched), until the upstream (at 1 token/s) has received every request;
   the runs are then stopped. Done twice (the first also warms up), then a third time
   by the second burst's users, each with a second message to the conversation its
   first one created (a start on an existing conversation: its lock, history and
   update). Prints starts per second (wall) and ms of CPU per start (this process, all
   threads), and the refusals.
   The upstream is ``bench.upstream`` in a process of its own, as a provider is (and as
   in bench.throughput); ``UPSTREAM=inprocess`` uses the demo model server on this
   process's event loop instead, whose CPU (accepting, parsing, answering each
   request) then counts as the worker's.

    SQLITE_PATH=/tmp/starts.sqlite3 python -m bench.starts      # SQLite (migrated here)
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/db REDIS_URL=redis://127.0.0.1:6379/9 \
        python -m bench.starts                                 # PostgreSQL + Redis
    N=300 C=20 DATABASE_CONN_MAX_AGE=0 python -m bench.starts    # other settings
    UPSTREAM=inprocess python -m bench.starts                      # the demo server

It creates 3 N + 1 users and their conversations in that database: use a scratch one.
Figures: docs/performance.md, "Bursts of starts" (before: docs/history/performance-2026.md,
"The cost of a start").
"""

from __future__ import annotations

import asyncio
import inspect
import os
import time
import uuid

CHECKPOINT_RUNS = 200
CHECKPOINT_ROUNDS = 20


def statements_per_batch(user_model, size: int = 20) -> int:
    """Statements of one batch of ``size`` starts (startqueue.prepare_batch), each of a
    user of its own on a new conversation."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from chat.generation.startqueue import StartRequest, prepare_batch

    users = [user_model.objects.create(username=f"starts-{uuid.uuid4().hex[:10]}")
             for _ in range(size)]
    with CaptureQueriesContext(connection) as captured:
        results = prepare_batch([StartRequest(user, uuid.uuid4(), "hello there", create={})
                                 for user in users])
    assert not any(isinstance(r, Exception) for r in results), results
    return len(captured)


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
    # These runs never streamed: ended here, so the lease sweep does not finish them
    # (and spend its CPU) during the bursts.
    from chat.models import Message

    ended = database_sync_to_async(
        lambda: Message.objects.filter(id__in=[r.assistant_message["id"] for r in runs])
        .update(status=Message.Status.COMPLETED), thread_sensitive=False)
    await ended()


async def bursts(users_per_burst: list[list], upstream_port: int | None) -> None:
    """Each list of users starts one run each, all in the same instant (see the module).
    ``upstream_port``: the bench.upstream the app streams from, None for the demo
    model server on this loop."""
    from django.conf import settings

    from chat.generation import service
    from chat.generation.errors import GenerationError
    from chat.generation.runtime import Runtime

    settings.DEMO_TOKENS_PER_SECOND = 1.0
    # Starts per second, not admission: a loop late because the machine is busy would
    # refuse the second burst for lag (the starts signal stays on).
    settings.CHAT_TUNING = settings.CHAT_TUNING.replace(max_loop_lag_ms=0)
    runtime = Runtime.current()
    if upstream_port is None:
        from bench.upstream import tag_of

        server = await runtime.demo_server(settings.DEMO_TOKENS_PER_SECOND)

        async def received(tag: str) -> int:
            return sum(1 for r in server.requests if tag_of(r.body.get("messages")) == tag)
    else:
        from bench.common import upstream_stats

        async def received(tag: str) -> int:
            stats = await asyncio.to_thread(upstream_stats, upstream_port, tag)
            return len(stats["requests"])
    # First-use costs (the provider client, its profile, the connection) before timing.
    warm = await service.start_generation(users_per_burst[0][0], uuid.uuid4(), "warm-up",
                                          create={})
    warm.cancel("stop")
    await warm.wait()
    # (user, conversation id or None for a new one) per start of each burst; the last
    # burst's users then write again to the conversations they created.
    plan = [[(user, None) for user in users] for users in users_per_burst]
    plan.append(None)
    started: list = []
    for n, starts in enumerate(plan, 1):
        if starts is None:
            starts = [(g.run.user_id, g.conversation_id) for g in started]
            owners = {u.id: u for u in users_per_burst[-1]}
            starts = [(owners[user_id], conversation) for user_id, conversation in starts]
        starts = starts[1:] if n == 1 else starts
        estimate = runtime.start_service_ms
        tag = f"burst-{n}-{uuid.uuid4().hex[:8]} hello there, a question"
        wall, cpu = time.perf_counter(), time.process_time()
        outcomes = await asyncio.gather(
            *(service.start_generation(user, conversation or uuid.uuid4(), tag,
                                       create=None if conversation else {})
              for user, conversation in starts),
            return_exceptions=True)
        started = [o for o in outcomes if not isinstance(o, BaseException)]
        while await received(tag) < len(started):
            await asyncio.sleep(0.002 if upstream_port is None else 0.05)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        refused: dict[str, int] = {}
        for outcome in outcomes:
            if isinstance(outcome, GenerationError):
                key = f"{outcome.code} {getattr(outcome, 'extra', {}).get('reason', '')}"
                refused[key.strip()] = refused.get(key.strip(), 0) + 1
            elif isinstance(outcome, BaseException):
                raise outcome
        kind = "existing" if starts[0][1] else "new"
        print(f"burst {n}: {len(starts)} starts at once on {kind} conversations, "
              f"{len(started)} started: "
              f"{len(started) / wall:.0f} starts/s (wall {wall * 1000:.0f} ms), "
              f"{cpu / max(1, len(started)) * 1000:.2f} ms CPU per start; "
              f"refused: {refused or 'none'} (the queue's estimate before: "
              f"{estimate:.1f} ms per start, after: {runtime.start_service_ms:.1f})")
        for generation in started:
            generation.cancel("stop")
        await asyncio.gather(*(generation.wait() for generation in started))


def main() -> None:
    upstream = None
    if os.environ.get("UPSTREAM", "process") != "inprocess":
        from pathlib import Path

        from bench.common import app_env, free_port, start_upstream

        port = free_port()
        upstream = start_upstream(port, dict(os.environ),
                                  Path("/tmp/bench-starts-upstream.log"),
                                  tokens_per_second=1.0, tokens=200)
        # The provider settings of bench.throughput's workers; this process's database
        # and channel layer stay as configured.
        for key in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "OPENAI_MAX_RETRIES", "CHAT_MODEL",
                    "CHAT_MODELS"):
            os.environ[key] = app_env(port, 200)[key]
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatproject.settings")
    os.environ.setdefault("DEBUG", "0")  # as the servers of bench.throughput
    try:
        _main(None if upstream is None else port)
    finally:
        if upstream is not None:
            from bench.common import stop_process

            stop_process(upstream)


def _main(upstream_port: int | None) -> None:
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
    print(f"statements per start, new / existing conversation: {new} / {existing}; "
          f"per batch of 20 starts on new conversations: {statements_per_batch(user_model)}")
    users = [user_model.objects.create(username=f"starts-{uuid.uuid4().hex[:10]}")
             for _ in range(3 * count)]
    connections.close_all()
    asyncio.run(measure(store, users[:count], concurrency))
    connections.close_all()
    print(f"bursts: the upstream {'in a process of its own' if upstream_port else 'on this loop'}")
    asyncio.run(bursts([users[count:2 * count], users[2 * count:]], upstream_port))


if __name__ == "__main__":
    main()
