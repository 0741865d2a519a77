"""Per-user budgets: quotas (tokens/USD per UTC day and month) and the number of
concurrent generations, checked before anything is sent upstream.

Over the WebSocket with the real loopback upstream server; the concurrency limit also
across two live daphne processes (run on PostgreSQL + Redis as well)."""

import asyncio
import datetime as dt
import json
import threading
import time
import uuid
from decimal import Decimal

import pytest
import websockets
from asgiref.sync import sync_to_async
from django.db import connection, transaction
from django.utils import timezone

from chat.generation import QuotaExceeded, budgets
from chat.models import Conversation, Message, ModelPrice, UsageRecord, UserBudget
from tests.conftest import session_cookie
from tests.eventually import eventually

pytestmark = pytest.mark.django_db(transaction=True)

UTC = dt.UTC
NOW = dt.datetime(2026, 11, 15, 12, 0, tzinfo=UTC)


def spend(user, tokens, *, cost="0", at=None, model="test-model"):
    return UsageRecord.objects.create(
        user=user, model=model, status="completed", prompt_tokens=tokens // 2,
        completion_tokens=tokens - tokens // 2, total_tokens=tokens, cost_usd=Decimal(cost),
        created_at=at or timezone.now(),
    )


def streaming_answer(user, *, heartbeat_age_s=0.0, model="test-model"):
    """An assistant message of ``user`` being generated (as another tab or process
    would have it), its lease refreshed ``heartbeat_age_s`` ago."""
    conversation = Conversation.objects.create(owner=user, title="elsewhere", model=model)
    Message.objects.create(conversation=conversation, role="user", content="hello there")
    now = timezone.now()
    return Message.objects.create(
        conversation=conversation, role="assistant", status="streaming", model=model,
        created_at=now, heartbeat_at=now - dt.timedelta(seconds=heartbeat_age_s),
    )


# --- the check itself -------------------------------------------------------------------------
def check(user, **kwargs):
    """``budgets.check`` as prepare_run calls it: inside a transaction."""
    with transaction.atomic():
        budgets.check(user, **kwargs)


def test_the_check_refuses_to_run_outside_a_transaction(alice):
    with pytest.raises(RuntimeError):
        budgets.check(alice, prompt_tokens=1, max_tokens=1)


def test_a_request_that_fits_exactly_is_allowed_and_one_token_more_is_not(alice):
    UserBudget.objects.create(user=alice, tokens_per_day=1000)
    spend(alice, 400, at=NOW - dt.timedelta(hours=1))
    check(alice, prompt_tokens=100, max_tokens=500, now=NOW)
    with pytest.raises(QuotaExceeded) as refused:
        check(alice, prompt_tokens=101, max_tokens=500, now=NOW)
    frame = refused.value.to_frame()
    assert frame["code"] == "quota_exceeded"
    assert frame["limit"] == "tokens_per_day"
    assert frame["remaining"] == {"tokens_per_day": 600}
    assert frame["requested"]["tokens"] == 601
    assert frame["resets_at"] == "2026-11-16T00:00:00Z"
    assert "daily" in frame["detail"]


def test_yesterdays_usage_counts_for_the_month_but_not_for_the_day(alice):
    spend(alice, 900, at=dt.datetime(2026, 11, 14, 23, 59, 59, tzinfo=UTC))
    budget = UserBudget.objects.create(user=alice, tokens_per_day=1000)
    check(alice, prompt_tokens=50, max_tokens=50, now=NOW)
    budget.tokens_per_month = 1000
    budget.save()
    with pytest.raises(QuotaExceeded) as refused:
        check(alice, prompt_tokens=50, max_tokens=51, now=NOW)
    frame = refused.value.to_frame()
    assert frame["limit"] == "tokens_per_month"
    assert frame["remaining"] == {"tokens_per_day": 1000, "tokens_per_month": 100}
    assert frame["resets_at"] == "2026-12-01T00:00:00Z"


def test_last_months_usage_does_not_count(alice):
    UserBudget.objects.create(user=alice, tokens_per_month=1000)
    spend(alice, 5000, at=dt.datetime(2026, 10, 31, 23, 0, tzinfo=UTC))
    check(alice, prompt_tokens=500, max_tokens=500, now=NOW)


def test_the_monthly_limit_of_december_resets_on_the_first_of_january(alice):
    UserBudget.objects.create(user=alice, tokens_per_month=10)
    with pytest.raises(QuotaExceeded) as refused:
        check(alice, prompt_tokens=10, max_tokens=1,
                      now=dt.datetime(2026, 12, 31, 23, 0, tzinfo=UTC))
    assert refused.value.extra["resets_at"] == "2027-01-01T00:00:00Z"


def test_the_usd_limit_counts_the_request_at_current_prices(alice):
    ModelPrice.objects.create(model="test-model", input_per_mtok=Decimal("1"),
                              output_per_mtok=Decimal("2"),
                              valid_from=timezone.now() - dt.timedelta(days=1))
    UserBudget.objects.create(user=alice, usd_per_day=Decimal("0.0100"))
    spend(alice, 10, cost="0.009", at=NOW - dt.timedelta(hours=1))
    # 1000 prompt tokens at $1/M + 500 max_tokens at $2/M = $0.002 > $0.001 left
    with pytest.raises(QuotaExceeded) as refused:
        check(alice, prompt_tokens=1000, max_tokens=500, model="test-model", now=NOW)
    frame = refused.value.to_frame()
    assert frame["limit"] == "usd_per_day"
    assert frame["remaining"] == {"usd_per_day": "0.0010"}
    assert frame["requested"] == {"tokens": 1500, "usd": "0.00200000"}
    # Half of it fits ($0.001).
    check(alice, prompt_tokens=500, max_tokens=250, model="test-model", now=NOW)


def test_other_users_usage_does_not_count(alice, bob):
    UserBudget.objects.create(user=alice, tokens_per_day=1000)
    spend(bob, 100_000, at=NOW)
    check(alice, prompt_tokens=500, max_tokens=500, now=NOW)


def test_empty_limits_are_unlimited(alice):
    UserBudget.objects.create(user=alice)
    spend(alice, 10**9, cost="99999", at=NOW)
    check(alice, prompt_tokens=10**6, max_tokens=10**6, now=NOW)


def test_generations_still_running_hold_their_share_of_the_budget(alice):
    running = streaming_answer(alice)
    held = 700  # its prompt plus its own max_tokens, stored when it started
    Message.objects.filter(pk=running.pk).update(reserved_tokens=held)
    UserBudget.objects.create(user=alice, tokens_per_day=held + 600, max_concurrent=2)
    check(alice, prompt_tokens=100, max_tokens=500)
    with pytest.raises(QuotaExceeded):
        check(alice, prompt_tokens=101, max_tokens=500)


def test_a_user_without_a_budget_may_run_one_generation_at_a_time(alice):
    check(alice, prompt_tokens=10, max_tokens=10)
    streaming_answer(alice)
    with pytest.raises(budgets.ConcurrencyLimit) as refused:
        check(alice, prompt_tokens=10, max_tokens=10)
    frame = refused.value.to_frame()
    assert frame["code"] == "concurrency_limit"
    assert (frame["limit"], frame["running"]) == (1, 1)


def test_max_concurrent_allows_that_many_generations(alice, bob):
    UserBudget.objects.create(user=alice, max_concurrent=2)
    streaming_answer(alice)
    streaming_answer(bob)  # someone else's run does not count
    check(alice, prompt_tokens=10, max_tokens=10)
    streaming_answer(alice)
    with pytest.raises(budgets.ConcurrencyLimit):
        check(alice, prompt_tokens=10, max_tokens=10)


def test_a_run_whose_process_died_does_not_count(alice, settings):
    streaming_answer(alice, heartbeat_age_s=settings.CHAT_TUNING.lease_s + 5)
    check(alice, prompt_tokens=10, max_tokens=10)


def test_two_starts_that_overlap_are_checked_one_after_the_other(alice):
    """The first start holds its transaction open between the check and the creation
    of its streaming row; the second, in another conversation and thread (its own
    database connection), must wait for it and then see that row."""
    first_checked = threading.Event()
    outcome = {}

    def first():
        try:
            with transaction.atomic():
                budgets.check(alice, prompt_tokens=10, max_tokens=10)
                first_checked.set()
                time.sleep(1.0)  # the window in which an unserialised check would race
                streaming_answer(alice)
            outcome["first"] = "started"
        finally:
            first_checked.set()
            connection.close()

    def second():
        first_checked.wait(10)
        try:
            check(alice, prompt_tokens=10, max_tokens=10)
            outcome["second"] = "started"
        except budgets.ConcurrencyLimit:
            outcome["second"] = "refused"
        finally:
            connection.close()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert outcome == {"first": "started", "second": "refused"}


def test_max_concurrent_zero_suspends_the_user(alice):
    UserBudget.objects.create(user=alice, max_concurrent=0)
    with pytest.raises(budgets.ConcurrencyLimit):
        check(alice, prompt_tokens=1, max_tokens=1)


# --- over the WebSocket -----------------------------------------------------------------------
async def test_a_user_over_the_daily_limit_gets_quota_exceeded_and_nothing_goes_upstream(
    alice, upstream, connect
):
    await UserBudget.objects.acreate(user=alice, tokens_per_day=2000)
    await sync_to_async(spend)(alice, 1500)
    conversation_id = uuid.uuid4()
    connected, _, ws = await connect(alice, conversation_id)
    assert connected
    assert (await ws.receive())["type"] == "state"

    await ws.send({"type": "message", "content": "Tell me everything about budgets"})
    frame = await ws.receive()
    assert frame["type"] == "error" and frame["code"] == "quota_exceeded"
    assert frame["limit"] == "tokens_per_day"
    assert frame["remaining"] == {"tokens_per_day": 500}
    assert frame["requested"]["tokens"] > 1024  # the prompt plus max_tokens
    tomorrow = (timezone.now().astimezone(UTC) + dt.timedelta(days=1)).date()
    assert frame["resets_at"] == f"{tomorrow.isoformat()}T00:00:00Z"

    await asyncio.sleep(0.3)
    assert upstream.requests == []
    assert not await Conversation.objects.filter(id=conversation_id).aexists()
    assert await Message.objects.acount() == 0

    # The socket stays usable: once the limit is raised, the same request runs.
    await UserBudget.objects.filter(user=alice).aupdate(tokens_per_day=100_000)
    await ws.send({"type": "message", "content": "Tell me everything about budgets"})
    end = await ws.receive_type("generation.end", timeout=20)
    assert end["status"] == "completed"
    assert len(upstream.requests) == 1


async def _start_both(sockets):
    """Send a message on every socket at once; return each socket's first answer to it
    (``generation.start`` or ``error``)."""
    await asyncio.gather(*(
        ws.send({"type": "message", "content": f"Question number {n}"})
        for n, ws in enumerate(sockets)
    ))
    return await asyncio.gather(*(
        ws.receive_until(lambda f: f["type"] in ("generation.start", "error"))
        for ws in sockets
    ))


async def test_two_sockets_of_one_user_starting_at_once_run_exactly_one_generation(
    alice, upstream, connect
):
    sockets = []
    for _ in range(2):
        connected, _, ws = await connect(alice, uuid.uuid4())
        assert connected
        await ws.receive_type("state")
        sockets.append(ws)
    upstream.tokens_per_second = 20

    answers = await _start_both(sockets)
    kinds = sorted(a["type"] for a in answers)
    assert kinds == ["error", "generation.start"]
    refused = next(a for a in answers if a["type"] == "error")
    assert refused["code"] == "concurrency_limit" and refused["limit"] == 1
    # Not wait_for: it would block the event loop the run needs to send its request.
    assert await upstream.until(lambda: len(upstream.requests) == 1, 5)
    await asyncio.sleep(0.3)
    assert len(upstream.requests) == 1

    # Once the running one is stopped, the other tab may start.
    runner = sockets[[a["type"] for a in answers].index("generation.start")]
    other = sockets[1 - sockets.index(runner)]
    await runner.send({"type": "stop"})
    assert (await runner.receive_type("generation.end"))["status"] == "cancelled"
    await other.send({"type": "message", "content": "My turn now"})
    assert (await other.receive_until(
        lambda f: f["type"] in ("generation.start", "error")))["type"] == "generation.start"
    await other.send({"type": "stop"})
    await other.receive_type("generation.end")


@pytest.mark.multiprocess
async def test_the_concurrency_limit_holds_across_two_server_processes(
    alice, upstream, asgi_servers
):
    upstream.tokens_per_second = 20
    servers = [asgi_servers("budget-a"), asgi_servers("budget-b")]
    cookie = await sync_to_async(session_cookie)(alice)

    async def open_socket(server):
        ws = await websockets.connect(
            f"{server.ws_url}/ws/conversations/{uuid.uuid4()}/",
            additional_headers={"Cookie": cookie, "Origin": server.url},
        )
        assert json.loads(await ws.recv())["type"] == "state"
        return ws

    async def first_answer(ws):
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if frame["type"] in ("generation.start", "error"):
                return frame

    outcomes = []
    for attempt in range(3):
        sockets = [await open_socket(server) for server in servers]
        try:
            await asyncio.gather(*(
                ws.send(json.dumps({"type": "message", "content": f"Race {attempt}"}))
                for ws in sockets
            ))
            answers = await asyncio.gather(*(first_answer(ws) for ws in sockets))
            outcomes.append(sorted(a["type"] for a in answers))
            assert sorted(a.get("code", "") for a in answers) == ["", "concurrency_limit"]
        finally:
            for ws in sockets:
                await ws.close()  # closing the tab that started it stops the run
        streaming = Message.objects.filter(status="streaming")

        async def none_streaming(streaming=streaming):
            return not await streaming.aexists()

        await eventually(none_streaming)
        assert not await streaming.aexists()
    assert outcomes == [["error", "generation.start"]] * 3
    # One request per attempt at most (a close right after generation.start may even
    # cancel the run before its request reaches the provider).
    assert len(upstream.requests) <= 3
