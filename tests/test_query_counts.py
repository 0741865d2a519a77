"""The socket's state load and the history API run a constant number of queries,
whatever the number of messages (no query per message or per usage record)."""

import uuid

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from chat import generation as gen
from chat.models import Conversation, Message, UsageRecord

pytestmark = pytest.mark.django_db


def conversation_with(user, pairs: int) -> Conversation:
    conversation = Conversation.objects.create(owner=user, title="counted")
    for n in range(pairs):
        Message.objects.create(conversation=conversation, role="user", content=f"q{n}")
        answer = Message.objects.create(conversation=conversation, role="assistant",
                                        content=f"a{n}", status="completed", model="m")
        UsageRecord.objects.create(user=user, conversation=conversation, message=answer,
                                   model="m", status="completed", prompt_tokens=1)
    Message.objects.create(conversation=conversation, role="assistant", status="streaming",
                           content="so far", model="m")
    return conversation


def queries_of(call) -> int:
    with CaptureQueriesContext(connection) as captured:
        call()
    return len(captured)


def test_loading_a_sockets_state_takes_two_queries_for_any_number_of_messages(
    alice, django_assert_num_queries
):
    small, large = conversation_with(alice, 1), conversation_with(alice, 30)
    with django_assert_num_queries(2):
        state = gen.load_state(alice, small.id)
    assert len(state["messages"]) == 3 and state["streaming"]["content"] == "so far"
    with django_assert_num_queries(2):
        state = gen.load_state(alice, large.id)
    assert len(state["messages"]) == 61
    assert all(m["usage"] for m in state["messages"] if m["status"] == "completed"
               and m["role"] == "assistant")


def test_the_history_api_runs_as_many_queries_for_60_messages_as_for_2(
    alice, client, django_assert_num_queries
):
    client.force_login(alice)
    small, large = conversation_with(alice, 1), conversation_with(alice, 30)

    def history(conversation):
        response = client.get(f"/api/conversations/{conversation.id}/messages/")
        assert response.status_code == 200
        return response.json()

    expected = queries_of(lambda: history(small))
    with django_assert_num_queries(expected):
        page = history(large)
    assert len(page["results"]) == 50  # one page of the 61
    assert expected <= 5  # session, user, conversation, messages with their usage


def test_a_start_takes_a_fixed_small_number_of_statements(alice):
    """store.prepare_message: every statement of a start lengthens the queue the next
    starts wait in (SQLite runs one writing transaction at a time), so their number is
    pinned (docs/performance.md, "The cost of a start"): on a new conversation, the
    lock, the conversation's insert (in a savepoint), the user's lock with their budget,
    the count of their running answers and one insert of both messages; on an existing
    one, the streaming check, the history and the conversation's update instead of
    the insert. Before: 17 and 14 statements."""
    from chat.generation import store

    def start(conversation_id, text):
        with CaptureQueriesContext(connection) as captured:
            run = store.prepare_message(alice, conversation_id, text, {})
        return run, [q["sql"].split()[0] for q in captured]

    run, first = start(uuid.uuid4(), "hello")
    Message.objects.filter(id=run.assistant_message["id"]).update(status="completed")
    again, second = start(run.conversation["id"], "and again")
    # Savepoints (of the atomic block nested in the test's transaction) and statements.
    assert len(first) == 9, first
    assert len(second) == 9, second
    assert first.count("INSERT") == 2 and second.count("INSERT") == 1, (first, second)
    assert [m["content"] for m in gen.load_state(alice, run.conversation["id"])["messages"]
            if m["role"] == "user"] == ["hello", "and again"]
    assert again.prompt[-1] == {"role": "user", "content": "and again"}
    assert again.assistant_message["usage"] is None


def test_a_batch_of_starts_takes_the_same_few_statements_whatever_its_size(
    django_user_model,
):
    """startqueue.prepare_batch: starts committed together share their users' lock, the
    count of their running answers, their conversations' lock and the inserts of their
    conversations and messages: five statements for the batch, none per start on a new
    conversation (a start alone takes nine). On existing conversations the batch reads
    their running answers and histories and updates them, one statement each instead
    of one per start, and no start needs a savepoint."""
    from chat.generation import store
    from chat.generation.startqueue import StartRequest, prepare_batch

    users = [django_user_model.objects.create_user(f"user{n}") for n in range(10)]
    starts = [StartRequest(user, uuid.uuid4(), f"question {n}")
              for n, user in enumerate(users)]
    with CaptureQueriesContext(connection) as captured:
        runs = prepare_batch(starts)
    assert all(isinstance(run, store.PreparedRun) for run in runs), runs
    # The batch's own savepoint and release (nested in the test's transaction) too.
    assert len(captured) == 2 + 5, [q["sql"][:60] for q in captured]
    assert Message.objects.filter(role="assistant", status="streaming").count() == 10

    Message.objects.filter(role="assistant").update(status="completed")
    again = [StartRequest(start.user, start.conversation_id, "and again") for start in starts]
    with CaptureQueriesContext(connection) as captured:
        runs = prepare_batch(again)
    assert all(isinstance(run, store.PreparedRun) for run in runs), runs
    assert len(captured) == 2 + 7, [q["sql"][:60] for q in captured]
    assert [run.prompt[1:] for run in runs] == [
        [{"role": "user", "content": f"question {n}"}, {"role": "user", "content": "and again"}]
        for n in range(len(again))]
    assert Conversation.objects.filter(updated_at__gte=min(
        m.created_at for m in Message.objects.filter(content="and again"))).count() == 10
