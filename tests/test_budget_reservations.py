"""Each running generation holds its own reservation of its user's quotas (its prompt
plus its own completion ceiling), stored on its row when it starts: a second run with a
small ceiling cannot slip past the quota by making the first one look small.

Over the WebSocket with the real loopback upstream holding the first run open, and at
the start transaction (store.prepare_message) for bursts of concurrent starts in
threads with their own database connections (run on PostgreSQL + Redis as well)."""

import datetime as dt
import threading
import uuid
from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection
from django.utils import timezone

from chat import accounting
from chat.generation import QuotaExceeded, store
from chat.models import Message, ModelPrice, UserBudget

pytestmark = pytest.mark.django_db(transaction=True)

QUESTION = "Tell me everything about budgets"


def prompt_tokens(content: str = QUESTION) -> int:
    """The estimated prompt of a first message ``content`` (system prompt + it)."""
    return accounting.count_prompt_tokens([
        {"role": "system", "content": settings.CHAT_SYSTEM_PROMPT},
        {"role": "user", "content": content},
    ])


def start(user, *, max_answer_tokens=None, content=QUESTION):
    """A run of ``user`` in a new conversation, as a first ``message`` frame starts it
    (its row stays ``streaming``: nothing ends it here)."""
    create = {} if max_answer_tokens is None else {"max_answer_tokens": max_answer_tokens}
    return store.prepare_message(user, uuid.uuid4(), content, create)


def running_count(user) -> int:
    return Message.objects.filter(conversation__owner=user, status="streaming").count()


# --- over the WebSocket: the scenario of the report ---------------------------------------------
async def test_a_second_run_with_a_one_token_ceiling_is_refused_while_the_first_holds_the_quota(
    alice, upstream, connect
):
    """tokens_per_day 1060, two runs allowed at once: the first run (no ceiling) holds
    its prompt plus CHAT_MAX_TOKENS while it streams; the second, asking for one answer
    token, does not fit what is left and nothing more is sent upstream."""
    upstream.tokens_per_second = 5  # the first run keeps streaming for the whole test
    await UserBudget.objects.acreate(user=alice, tokens_per_day=1060, max_concurrent=2)
    _, _, first = await connect(alice, uuid.uuid4())
    await first.receive_type("state")
    await first.send({"type": "message", "content": QUESTION})
    started = await first.receive_until(lambda f: f["type"] in ("generation.start", "error"))
    assert started["type"] == "generation.start", started
    prompt = await sync_to_async(prompt_tokens)()
    first_holds = prompt + settings.CHAT_MAX_TOKENS
    assert 1060 - first_holds < prompt + 1  # what is left cannot pay for the second run

    _, _, second = await connect(alice, uuid.uuid4())
    await second.receive_type("state")
    await second.send({"type": "message", "content": QUESTION, "max_answer_tokens": 1})
    refused = await second.receive_until(lambda f: f["type"] in ("generation.start", "error"))
    assert refused["type"] == "error" and refused["code"] == "quota_exceeded", refused
    assert refused["remaining"] == {"tokens_per_day": 1060 - first_holds}
    assert refused["requested"]["tokens"] == prompt + 1
    # The first run's request reaches the upstream (a start returns before it is sent);
    # the refused one never does.
    assert await upstream.until(lambda: len(upstream.requests) >= 1, timeout=5.0)
    assert len(upstream.requests) == 1
    assert await sync_to_async(running_count)(alice) == 1

    await first.send({"type": "stop"})
    assert (await first.receive_type("generation.end"))["status"] == "cancelled"


# --- at the start transaction -------------------------------------------------------------------
def test_a_140_token_day_holds_the_first_runs_ceiling_against_a_second_small_run(alice):
    prompt = prompt_tokens()
    first_ceiling = 140 - prompt - 5  # the first run fits with 5 tokens to spare
    UserBudget.objects.create(user=alice, tokens_per_day=140, max_concurrent=2)
    start(alice, max_answer_tokens=first_ceiling)
    with pytest.raises(QuotaExceeded) as refused:
        start(alice, max_answer_tokens=1)
    assert refused.value.extra["remaining"] == {"tokens_per_day": 5}
    assert running_count(alice) == 1


def test_a_run_that_fits_beside_the_running_one_still_starts(alice):
    prompt = prompt_tokens()
    UserBudget.objects.create(user=alice, tokens_per_day=2 * prompt + 100 + 1,
                              max_concurrent=2)
    start(alice, max_answer_tokens=100)
    start(alice, max_answer_tokens=1)  # exactly what is left
    assert running_count(alice) == 2


def test_a_usd_quota_counts_the_running_run_at_its_own_ceiling(alice):
    ModelPrice.objects.create(model="", input_per_mtok=Decimal("1000"),
                              output_per_mtok=Decimal("1000"),
                              valid_from=timezone.now() - dt.timedelta(days=1))
    prompt = prompt_tokens()
    # $0.001 per token: the first run (no ceiling) holds (prompt + CHAT_MAX_TOKENS) m$,
    # and leaves less than the second one's prompt + 1.
    first_usd = Decimal(prompt + settings.CHAT_MAX_TOKENS) / 1000
    UserBudget.objects.create(user=alice, usd_per_day=first_usd + Decimal(prompt) / 1000,
                              max_concurrent=2)
    start(alice)
    with pytest.raises(QuotaExceeded) as refused:
        start(alice, max_answer_tokens=1)
    assert refused.value.extra["limit"] == "usd_per_day"
    assert running_count(alice) == 1


def test_a_run_started_before_its_user_had_a_quota_still_holds_its_tokens(alice):
    """Started without a quota, the run's USD was not priced; a USD quota set while it
    runs counts its tokens at the model's dearer price rather than at nothing."""
    ModelPrice.objects.create(model="", input_per_mtok=Decimal("1000"),
                              output_per_mtok=Decimal("1000"),
                              valid_from=timezone.now() - dt.timedelta(days=1))
    budget = UserBudget.objects.create(user=alice, max_concurrent=2)
    start(alice)
    prompt = prompt_tokens()
    budget.usd_per_day = Decimal(prompt + settings.CHAT_MAX_TOKENS + prompt) / 1000
    budget.save()
    with pytest.raises(QuotaExceeded) as refused:
        start(alice, max_answer_tokens=1)
    assert refused.value.extra["limit"] == "usd_per_day"


def burst_of_one_token_starts(user, count: int) -> list[str]:
    """``count`` starts of one-token runs by ``user`` in as many threads at once (each its
    own connection and transaction): "started" or "refused" for each."""
    barrier = threading.Barrier(count)
    outcomes = []
    lock = threading.Lock()

    def one():
        try:
            barrier.wait(10)
            try:
                start(user, max_answer_tokens=1)
                outcome = "started"
            except QuotaExceeded:
                outcome = "refused"
            with lock:
                outcomes.append(outcome)
        finally:
            connection.close()

    threads = [threading.Thread(target=one) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return outcomes


def test_a_burst_of_small_starts_beside_a_large_run_admits_exactly_what_fits(alice):
    """A large run streams; eight starts of one-token runs in eight threads at once
    (each its own connection and transaction) against a quota that fits exactly three
    of them: three start, five are refused, none over the quota."""
    prompt = prompt_tokens()
    small = prompt + 1
    UserBudget.objects.create(
        user=alice, max_concurrent=20,
        tokens_per_day=prompt + settings.CHAT_MAX_TOKENS + 3 * small,
    )
    start(alice)
    outcomes = burst_of_one_token_starts(alice, 8)
    assert sorted(outcomes) == ["refused"] * 5 + ["started"] * 3
    assert running_count(alice) == 4


def test_a_burst_of_equal_starts_admits_exactly_as_many_as_the_quota_fits(alice):
    prompt = prompt_tokens()
    each = prompt + 1
    UserBudget.objects.create(user=alice, max_concurrent=20, tokens_per_day=4 * each)
    outcomes = burst_of_one_token_starts(alice, 8)
    assert sorted(outcomes) == ["refused"] * 4 + ["started"] * 4
    assert running_count(alice) == 4
