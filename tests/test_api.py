"""The REST API: every endpoint shows the owner their data, answers 404 to anyone else
and 401/403 to anonymous requests; cursor pagination lists everything exactly once."""

import json
import uuid
from datetime import timedelta
from decimal import Decimal

import pytest
from django.test import AsyncClient
from django.utils import timezone
from rest_framework.test import APIClient

from chat.models import ApiToken, Conversation, Message, UsageRecord

pytestmark = pytest.mark.django_db(transaction=True)


# --- helpers ----------------------------------------------------------------------------
def client_for(user=None) -> APIClient:
    client = APIClient()
    if user is not None:
        _, key = ApiToken.issue(user, "tests")
        client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    return client


def make_conversation(user, title="Trip to Lisbon", messages=(), **fields) -> Conversation:
    conversation = Conversation.objects.create(owner=user, title=title, **fields)
    start = timezone.now() - timedelta(minutes=10)
    for i, (role, content) in enumerate(messages):
        message = Message.objects.create(
            conversation=conversation, role=role, content=content,
            status=Message.Status.COMPLETED, model="test-model" if role == "assistant" else "",
            created_at=start + timedelta(seconds=i), completed_at=start + timedelta(seconds=i),
            finish_reason="stop" if role == "assistant" else "",
        )
        if role == "assistant":
            UsageRecord.objects.create(
                user=user, conversation=conversation, message=message, model="test-model",
                status=Message.Status.COMPLETED, prompt_tokens=10, completion_tokens=5,
                total_tokens=15, cost_usd=Decimal("0.00001"),
            )
    return conversation


def follow_pages(client, url) -> list[dict]:
    items, pages = [], 0
    while url:
        response = client.get(url)
        assert response.status_code == 200, response.content
        body = response.json()
        items.extend(body["results"])
        url = body["next"]
        pages += 1
        assert pages < 100
    return items


@pytest.fixture
def alice_chat(alice):
    return make_conversation(
        alice, "Trip to Lisbon",
        [("user", "Where should I eat in Alfama?"), ("assistant", "Try the grilled sardines.")],
    )


# --- conversations ------------------------------------------------------------------------
def test_owner_lists_her_conversations_newest_activity_first(alice, bob):
    old = make_conversation(alice, "old", updated_at=timezone.now() - timedelta(days=2))
    new = make_conversation(alice, "new")
    make_conversation(bob, "bob's")
    body = client_for(alice).get("/api/conversations/").json()
    assert [c["id"] for c in body["results"]] == [str(new.id), str(old.id)]
    assert set(body["results"][0]) == {
        "id", "title", "model", "system_prompt", "repetition_guard", "max_answer_usd",
        "max_answer_tokens", "created_at", "updated_at",
    }


def test_cursor_pagination_lists_every_conversation_exactly_once(alice):
    same_time = timezone.now()
    ids = set()
    for i in range(23):
        # Many ties on updated_at: the id breaks them.
        when = same_time if i % 3 else same_time - timedelta(seconds=i)
        ids.add(str(make_conversation(alice, f"c{i}", updated_at=when).id))
    items = follow_pages(client_for(alice), "/api/conversations/?page_size=4")
    assert len(items) == 23
    assert {c["id"] for c in items} == ids


def test_search_finds_titles_and_message_text(alice, alice_chat):
    make_conversation(alice, "Sardines recipe")
    make_conversation(alice, "Unrelated", [("user", "what is a monad")])
    client = client_for(alice)

    def titles(query):
        return {c["title"] for c in client.get(f"/api/conversations/?search={query}").json()[
            "results"]}

    assert titles("SARDINES") == {"Trip to Lisbon", "Sardines recipe"}
    assert titles("monad") == {"Unrelated"}


def test_created_after_and_before_filter_by_creation_time(alice):
    now = timezone.now()
    make_conversation(alice, "last week", created_at=now - timedelta(days=7))
    make_conversation(alice, "today", created_at=now)
    client = client_for(alice)
    since = (now - timedelta(days=1)).isoformat()
    after = client.get("/api/conversations/", {"created_after": since}).json()["results"]
    before = client.get("/api/conversations/", {"created_before": since}).json()["results"]
    assert [c["title"] for c in after] == ["today"]
    assert [c["title"] for c in before] == ["last week"]
    bad = client.get("/api/conversations/", {"created_after": "yesterday"})
    assert bad.status_code == 400 and "created_after" in bad.json()


def test_create_get_patch_and_delete_a_conversation(alice, settings):
    client = client_for(alice)
    created = client.post("/api/conversations/", {"title": "Plans"}, format="json")
    assert created.status_code == 201
    conversation_id = created.json()["id"]
    assert created.json()["model"] == settings.CHAT_MODEL
    assert client.get(f"/api/conversations/{conversation_id}/").json()["title"] == "Plans"
    patched = client.patch(
        f"/api/conversations/{conversation_id}/",
        {"title": "Holiday", "system_prompt": "Be brief."}, format="json",
    )
    assert patched.status_code == 200
    assert patched.json()["title"] == "Holiday"
    assert patched.json()["system_prompt"] == "Be brief."
    assert client.delete(f"/api/conversations/{conversation_id}/").status_code == 204
    assert client.get(f"/api/conversations/{conversation_id}/").status_code == 404


def test_create_refuses_a_model_the_server_does_not_offer(alice):
    response = client_for(alice).post(
        "/api/conversations/", {"model": "gpt-9-ultra"}, format="json"
    )
    assert response.status_code == 400
    assert "model" in response.json()


def test_deleting_a_conversation_keeps_its_usage_records(alice, alice_chat):
    record = UsageRecord.objects.get(conversation=alice_chat)
    assert client_for(alice).delete(f"/api/conversations/{alice_chat.id}/").status_code == 204
    assert not Message.objects.filter(conversation_id=alice_chat.id).exists()
    record.refresh_from_db()
    assert record.conversation_id is None and record.message_id is None
    assert record.total_tokens == 15


def test_deleting_a_conversation_while_it_streams_is_refused(alice, alice_chat):
    Message.objects.create(
        conversation=alice_chat, role="assistant", status=Message.Status.STREAMING,
        heartbeat_at=timezone.now(),
    )
    response = client_for(alice).delete(f"/api/conversations/{alice_chat.id}/")
    assert response.status_code == 409
    assert response.json()["code"] == "busy"
    assert Conversation.objects.filter(id=alice_chat.id).exists()


# --- messages -----------------------------------------------------------------------------
def test_messages_are_listed_in_order_with_usage_on_answers(alice, alice_chat):
    body = client_for(alice).get(f"/api/conversations/{alice_chat.id}/messages/").json()
    user, assistant = body["results"]
    assert (user["role"], user["content"]) == ("user", "Where should I eat in Alfama?")
    assert user["usage"] is None and user["finish_reason"] is None
    assert assistant["role"] == "assistant"
    assert assistant["status"] == "completed"
    assert assistant["finish_reason"] == "stop"
    assert assistant["model"] == "test-model"
    assert assistant["completed_at"]
    assert assistant["usage"] == {
        "prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
        "reasoning_tokens": 0, "cached_tokens": 0, "source": "reported",
        "estimated": False, "reasoning_hidden": False, "cost_usd": "0.00001000",
    }


def test_superseded_messages_are_not_listed(alice, alice_chat):
    alice_chat.messages.filter(role="assistant").update(superseded=True)
    body = client_for(alice).get(f"/api/conversations/{alice_chat.id}/messages/").json()
    assert [m["role"] for m in body["results"]] == ["user"]


def test_cursor_pagination_lists_every_message_exactly_once(alice):
    conversation = make_conversation(
        alice, "long", [("user" if i % 2 == 0 else "assistant", f"m{i}") for i in range(31)]
    )
    items = follow_pages(
        client_for(alice), f"/api/conversations/{conversation.id}/messages/?page_size=5"
    )
    assert [m["content"] for m in items] == [f"m{i}" for i in range(31)]


# --- export -------------------------------------------------------------------------------
def test_export_as_json_is_a_download_of_the_transcript(alice, alice_chat):
    response = client_for(alice).get(f"/api/conversations/{alice_chat.id}/export?format=json")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/json")
    assert response["Content-Disposition"] == (
        f'attachment; filename="conversation-{alice_chat.id}.json"'
    )
    body = json.loads(response.content)
    assert body["conversation"]["title"] == "Trip to Lisbon"
    assert [m["content"] for m in body["messages"]] == [
        "Where should I eat in Alfama?", "Try the grilled sardines."
    ]


def test_export_as_markdown_is_a_download_of_the_transcript(alice, alice_chat):
    response = client_for(alice).get(
        f"/api/conversations/{alice_chat.id}/export?format=markdown"
    )
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/markdown")
    assert response["Content-Disposition"].endswith('.md"')
    text = response.content.decode()
    assert text.startswith("# Trip to Lisbon\n")
    assert "## User\n\nWhere should I eat in Alfama?" in text
    assert "## Assistant\n\nTry the grilled sardines." in text


def test_export_refuses_an_unknown_format_with_400(alice, alice_chat):
    response = client_for(alice).get(f"/api/conversations/{alice_chat.id}/export?format=pdf")
    assert response.status_code == 400
    assert "format" in response.json()


# --- usage --------------------------------------------------------------------------------
def test_usage_totals_by_day_and_by_model_count_stopped_runs(alice, bob):
    now = timezone.now()
    rows = [  # (days ago, model, status, prompt, completion, cost)
        (0, "gpt-4o-mini", "completed", 100, 50, "0.001"),
        (0, "gpt-4o-mini", "cancelled", 100, 10, "0.0002"),
        (3, "demo", "completed", 20, 30, "0"),
    ]
    for days, model, status, prompt, completion, cost in rows:
        UsageRecord.objects.create(
            user=alice, model=model, status=status, prompt_tokens=prompt,
            completion_tokens=completion, total_tokens=prompt + completion,
            cost_usd=Decimal(cost), created_at=now - timedelta(days=days),
        )
    UsageRecord.objects.create(user=bob, model="demo", status="completed", total_tokens=999)
    client = client_for(alice)
    by_day = client.get("/api/usage/").json()
    assert by_day["group_by"] == "day"
    assert by_day["totals"]["total_tokens"] == 310
    assert by_day["totals"]["runs"] == 3 and by_day["totals"]["stopped_runs"] == 1
    assert Decimal(by_day["totals"]["cost_usd"]) == Decimal("0.0012")
    assert [g["key"] for g in by_day["groups"]] == [
        str(now.date()), str((now - timedelta(days=3)).date())
    ]
    today = by_day["groups"][0]
    assert (today["prompt_tokens"], today["completion_tokens"], today["runs"],
            today["stopped_runs"]) == (200, 60, 2, 1)
    by_model = client.get("/api/usage/?group_by=model").json()
    assert [(g["key"], g["total_tokens"]) for g in by_model["groups"]] == [
        ("gpt-4o-mini", 260), ("demo", 50)
    ]
    since = client.get("/api/usage/", {"since": (now - timedelta(days=1)).isoformat()}).json()
    assert since["totals"]["runs"] == 2
    assert client.get("/api/usage/?group_by=week").status_code == 400


def test_usage_of_a_deleted_conversation_still_counts(alice, alice_chat):
    client = client_for(alice)
    client.delete(f"/api/conversations/{alice_chat.id}/")
    assert client.get("/api/usage/").json()["totals"]["total_tokens"] == 15


# --- access -------------------------------------------------------------------------------
def test_bob_gets_404_on_everything_of_alices_conversation(alice, bob, alice_chat):
    client = client_for(bob)
    base = f"/api/conversations/{alice_chat.id}"
    assert client.get(f"{base}/").status_code == 404
    assert client.patch(f"{base}/", {"title": "mine"}, format="json").status_code == 404
    assert client.delete(f"{base}/").status_code == 404
    assert client.get(f"{base}/messages/").status_code == 404
    assert client.post(f"{base}/messages/", {"content": "hi"}, format="json").status_code == 404
    assert client.get(f"{base}/export?format=json").status_code == 404
    assert client.get(f"{base}/export?format=markdown").status_code == 404
    assert client.post(f"{base}/stop").status_code == 404
    assert client.get("/api/conversations/").json()["results"] == []
    body = client.get(f"{base}/messages/").content.decode()
    assert "Alfama" not in body and "Lisbon" not in body
    alice_chat.refresh_from_db()
    assert alice_chat.title == "Trip to Lisbon"
    assert alice_chat.messages.count() == 2


@pytest.mark.parametrize(
    "method, path",
    [
        ("get", "/api/conversations/"),
        ("post", "/api/conversations/"),
        ("get", "/api/conversations/{id}/"),
        ("patch", "/api/conversations/{id}/"),
        ("delete", "/api/conversations/{id}/"),
        ("get", "/api/conversations/{id}/messages/"),
        ("post", "/api/conversations/{id}/messages/"),
        ("get", "/api/conversations/{id}/export?format=json"),
        ("post", "/api/conversations/{id}/stop"),
        ("get", "/api/usage/"),
        ("get", "/api/tokens/"),
        ("post", "/api/tokens/"),
    ],
)
def test_anonymous_requests_are_refused_with_401(alice_chat, method, path):
    response = getattr(APIClient(), method)(path.format(id=alice_chat.id), {}, format="json")
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Token"
    assert "Lisbon" not in response.content.decode()


def test_session_requests_without_csrf_token_are_refused(alice):
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(alice)
    assert client.get("/api/conversations/").status_code == 200
    response = client.post("/api/conversations/", {"title": "x"}, format="json")
    assert response.status_code == 403
    assert "CSRF" in response.json()["detail"]
    assert not Conversation.objects.exists()


def test_invalid_token_is_refused_with_401(alice_chat):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Token chat_not-a-real-key")
    assert client.get("/api/conversations/").status_code == 401


# --- post a message and stop (in-process ASGI, real loopback upstream) --------------------
async def test_post_message_waits_and_returns_the_finished_answer(alice, upstream):
    upstream.answer = "Grilled sardines and a glass of vinho verde."
    conversation = await Conversation.objects.acreate(owner=alice, title="")
    token, key = await _issue(alice)
    response = await api_post(
        key, f"/api/conversations/{conversation.id}/messages/", {"content": "Dinner in Alfama?"}
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["role"] == "assistant"
    assert body["status"] == "completed"
    assert body["content"] == "Grilled sardines and a glass of vinho verde."
    assert body["usage"]["completion_tokens"] > 0
    roles = [m.role async for m in Message.objects.filter(conversation=conversation)]
    assert sorted(roles) == ["assistant", "user"]
    await conversation.arefresh_from_db()
    assert conversation.title == "Dinner in Alfama?"


async def test_post_message_errors_are_json_with_clear_statuses(alice, upstream):
    token, key = await _issue(alice)
    conversation = await Conversation.objects.acreate(owner=alice)
    url = f"/api/conversations/{conversation.id}/messages/"
    empty = await api_post(key, url, {"content": "   "})
    assert empty.status_code == 400 and "content" in empty.json()
    missing = await api_post(key, f"/api/conversations/{uuid.uuid4()}/messages/", {"content": "hi"})
    assert missing.status_code == 404
    await Message.objects.acreate(
        conversation=conversation, role="assistant", status=Message.Status.STREAMING,
        heartbeat_at=timezone.now(),
    )
    busy = await api_post(key, url, {"content": "hi"})
    assert busy.status_code == 409
    assert busy.json()["code"] == "busy"


async def test_post_message_over_the_concurrency_limit_is_429(alice, upstream):
    # The default budget allows one running generation per user, across conversations.
    token, key = await _issue(alice)
    running = await Conversation.objects.acreate(owner=alice)
    await Message.objects.acreate(
        conversation=running, role="assistant", status=Message.Status.STREAMING,
        heartbeat_at=timezone.now(),
    )
    other = await Conversation.objects.acreate(owner=alice)
    refused = await api_post(key, f"/api/conversations/{other.id}/messages/", {"content": "hi"})
    assert refused.status_code == 429
    assert refused.json()["code"] == "concurrency_limit"


async def test_stop_endpoint_stops_a_generation_started_on_a_websocket(alice, bob, upstream,
                                                                      connect):
    upstream.tokens_per_second = 20
    ok, _, ws = await connect(alice)
    state = await ws.receive()
    assert ok and state["type"] == "state"
    await ws.send({"type": "message", "content": "Tell me a long story"})
    start = await ws.receive_type("generation.start")
    conversation_id = start["message"]["conversation_id"]
    await ws.receive_type("delta")
    _, bob_key = await _issue(bob)
    bob_stop = await api_post(bob_key, f"/api/conversations/{conversation_id}/stop")
    assert bob_stop.status_code == 404
    _, key = await _issue(alice)
    stop = await api_post(key, f"/api/conversations/{conversation_id}/stop")
    assert stop.status_code == 200
    assert stop.json() == {"running": True, "message_id": start["message"]["id"]}
    end = await ws.receive_type("generation.end")
    assert end["status"] == "cancelled"
    record = upstream.requests[-1]
    assert upstream.wait_for(lambda: record.client_closed_at is not None, 2)
    again = await api_post(key, f"/api/conversations/{conversation_id}/stop")
    assert again.json() == {"running": False, "message_id": None}
    await ws.close()


async def test_deltas_of_an_api_post_reach_open_websockets(alice, upstream, connect):
    upstream.answer = "One two three four five."
    conversation = await Conversation.objects.acreate(owner=alice)
    ok, _, ws = await connect(alice, conversation.id)
    await ws.receive()  # state
    _, key = await _issue(alice)
    response = await api_post(
        key, f"/api/conversations/{conversation.id}/messages/", {"content": "Count to five"}
    )
    assert response.status_code == 201
    end = await ws.receive_type("generation.end")
    assert end["status"] == "completed"
    assert ws.text(end["message_id"]) == "One two three four five."
    await ws.close()


async def api_post(key, url, data=None):
    """POST through the in-process ASGI handler (async views run on this event loop)."""
    return await AsyncClient().post(
        url, data or {}, content_type="application/json",
        headers={"Authorization": f"Token {key}"},
    )


async def _issue(user):
    from asgiref.sync import sync_to_async

    return await sync_to_async(ApiToken.issue)(user, "tests")


# --- docs ---------------------------------------------------------------------------------
def test_schema_and_offline_docs_are_served(db):
    client = APIClient()
    schema = client.get("/api/schema/?format=json")
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    for path in [
        "/api/conversations/", "/api/conversations/{conversation_id}/",
        "/api/conversations/{conversation_id}/messages/",
        "/api/conversations/{conversation_id}/export",
        "/api/conversations/{conversation_id}/stop", "/api/usage/", "/api/tokens/",
    ]:
        assert path in paths
    post = paths["/api/conversations/{conversation_id}/messages/"]["post"]
    assert set(post["responses"]) >= {"201", "200", "400", "401", "404", "409", "429"}
    assert "text/event-stream" in post["responses"]["200"]["content"]
    docs = client.get("/api/docs/").content.decode()
    assert "/static/drf_spectacular_sidecar/swagger-ui-dist/" in docs
    assert "cdn.jsdelivr.net" not in docs and "unpkg.com" not in docs
    redoc = client.get("/api/redoc/").content.decode()
    assert "/static/drf_spectacular_sidecar/redoc/" in redoc
    assert "fonts.googleapis.com" not in redoc
    for page in (docs, redoc):
        assert 'id="back-to-chat"' in page  # a way back to the chat from the API's docs


def test_date_filters_accept_any_iso_offset_and_refuse_out_of_range(alice):
    make_conversation(alice, "now")
    client = client_for(alice)
    # PostgreSQL itself refuses offsets beyond ±15:59; ISO 8601 allows them.
    far_offset = client.get(
        "/api/conversations/", {"created_after": "1548-07-12T00:46:44+23:17"}
    )
    assert far_offset.status_code == 200
    assert [c["title"] for c in far_offset.json()["results"]] == ["now"]
    underflow = client.get("/api/usage/", {"since": "0001-01-01T00:00:00+23:00"})
    assert underflow.status_code == 400 and "since" in underflow.json()


def test_browsable_api_pages_render_for_a_logged_in_user(alice, alice_chat):
    client = APIClient()
    client.force_login(alice)
    pages = {
        "/api/conversations/": "Trip to Lisbon",
        f"/api/conversations/{alice_chat.id}/": "Trip to Lisbon",
        f"/api/conversations/{alice_chat.id}/messages/": "grilled sardines",
        "/api/usage/": "total_tokens",
        "/api/tokens/": "Api Token",
    }
    for path, text in pages.items():
        response = client.get(path, HTTP_ACCEPT="text/html")
        assert response.status_code == 200, path
        assert response["Content-Type"].startswith("text/html")
        assert text in response.content.decode(), path


def test_schema_is_valid_openapi_3(db):
    from drf_spectacular.generators import SchemaGenerator
    from drf_spectacular.validation import validate_schema

    validate_schema(SchemaGenerator().get_schema(request=None, public=True))
