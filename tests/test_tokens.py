"""Personal API tokens: created and revoked on /settings/tokens/ or through the API,
usable on the REST API and on the WebSocket (``Authorization: Token``), dead once
revoked. Cookie-authenticated sockets keep the Origin check."""

import json
import re
import uuid

import pytest
import websockets
from asgiref.sync import sync_to_async
from django.test import Client
from rest_framework.test import APIClient

from chat.models import ApiToken
from tests.conftest import session_cookie

pytestmark = pytest.mark.django_db(transaction=True)


def logged_in(user, **kwargs) -> Client:
    client = Client(**kwargs)
    client.force_login(user)
    return client


def api(key) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    return client


# --- the page -----------------------------------------------------------------------------
def test_page_creates_a_token_and_shows_its_key_once(alice):
    client = logged_in(alice)
    response = client.post("/settings/tokens/", {"action": "create", "name": "backup script"})
    assert response.status_code == 200
    key = re.search(r'value="(chat_[^"]+)"', response.content.decode()).group(1)
    token = ApiToken.objects.get(user=alice)
    assert token.name == "backup script"
    assert key not in token.key_hash and token.key_hash == ApiToken.hash_key(key)
    page = client.get("/settings/tokens/").content.decode()
    assert "backup script" in page and key[:12] in page
    assert key not in page
    assert api(key).get("/api/conversations/").status_code == 200


def test_page_revokes_a_token(alice):
    _, key = ApiToken.issue(alice, "old laptop")
    client = logged_in(alice)
    token_id = ApiToken.objects.get(user=alice).id
    response = client.post("/settings/tokens/", {"action": "revoke", "token_id": token_id})
    assert response.status_code == 302
    assert not ApiToken.objects.exists()
    assert api(key).get("/api/conversations/").status_code == 401


def test_page_refuses_to_revoke_someone_elses_token(alice, bob):
    ApiToken.issue(alice, "alice's")
    token_id = ApiToken.objects.get(user=alice).id
    response = logged_in(bob).post(
        "/settings/tokens/", {"action": "revoke", "token_id": token_id}
    )
    assert response.status_code == 404
    assert ApiToken.objects.filter(id=token_id).exists()
    assert "alice's" not in logged_in(bob).get("/settings/tokens/").content.decode()


def test_page_needs_a_name_login_and_a_csrf_token(alice):
    response = logged_in(alice).post("/settings/tokens/", {"action": "create", "name": "  "})
    assert response.status_code == 400 and b"Give the token a name" in response.content
    assert Client().get("/settings/tokens/").status_code == 302
    strict = logged_in(alice, enforce_csrf_checks=True)
    assert strict.post("/settings/tokens/", {"action": "create", "name": "x"}).status_code == 403
    assert not ApiToken.objects.exists()


# --- the API ------------------------------------------------------------------------------
def test_api_creates_lists_and_revokes_tokens(alice, bob):
    _, key = ApiToken.issue(alice, "first")
    client = api(key)
    created = client.post("/api/tokens/", {"name": "ci job"}, format="json")
    assert created.status_code == 201
    new_key = created.json()["key"]
    assert new_key.startswith("chat_") and created.json()["prefix"] == new_key[:12]
    listed = client.get("/api/tokens/").json()
    assert {t["name"] for t in listed} == {"first", "ci job"}
    assert all("key" not in t for t in listed)
    _, bob_key = ApiToken.issue(bob, "bob's")
    assert api(bob_key).delete(f"/api/tokens/{created.json()['id']}/").status_code == 404
    assert client.delete(f"/api/tokens/{created.json()['id']}/").status_code == 204
    assert api(new_key).get("/api/tokens/").status_code == 401


def test_using_a_token_records_when_it_was_last_used(alice):
    token, key = ApiToken.issue(alice, "cron")
    assert token.last_used_at is None
    api(key).get("/api/usage/")
    token.refresh_from_db()
    assert token.last_used_at is not None


# --- the WebSocket ------------------------------------------------------------------------
async def test_token_authenticates_a_websocket_without_origin_and_revoking_ends_it(
    alice, asgi_server, upstream
):
    upstream.answer = "Hello from upstream."
    token, key = await sync_to_async(ApiToken.issue)(alice, "socket script")
    url = f"{asgi_server.ws_url}/ws/conversations/{uuid.uuid4()}/"
    # A script: no Origin header, no cookie.
    async with websockets.connect(url, additional_headers={"Authorization": f"Token {key}"}) as ws:
        state = json.loads(await ws.recv())
        assert state["type"] == "state"
        await ws.send(json.dumps({"type": "message", "content": "Say hello"}))
        while (frame := json.loads(await ws.recv()))["type"] != "generation.end":
            pass
        assert frame["status"] == "completed"
    await sync_to_async(token.delete)()
    async with websockets.connect(url, additional_headers={"Authorization": f"Token {key}"}) as ws:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd.code == 4401


async def test_cookie_websockets_still_need_an_allowed_origin(alice, asgi_server, upstream):
    cookie = await sync_to_async(session_cookie)(alice)
    url = f"{asgi_server.ws_url}/ws/conversations/{uuid.uuid4()}/"
    for headers in ({"Cookie": cookie}, {"Cookie": cookie, "Origin": "https://evil.example"}):
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(url, additional_headers=headers):
                pass
        assert refused.value.response.status_code == 403
    headers = {"Cookie": cookie, "Origin": asgi_server.url}
    async with websockets.connect(url, additional_headers=headers) as ws:
        assert json.loads(await ws.recv())["type"] == "state"


async def test_an_sse_post_streams_to_a_token_websocket_of_the_conversation(
    alice, asgi_server, upstream
):
    """Deltas of an API request reach the open sockets of the conversation."""
    import aiohttp

    upstream.answer = "Shared between the API and the socket."
    _, key = await sync_to_async(ApiToken.issue)(alice, "both")
    auth = {"Authorization": f"Token {key}"}
    async with aiohttp.ClientSession(headers=auth) as session:
        async with session.post(f"{asgi_server.url}/api/conversations/", json={}) as created:
            conversation_id = (await created.json())["id"]
        url = f"{asgi_server.ws_url}/ws/conversations/{conversation_id}/"
        async with websockets.connect(url, additional_headers=auth) as ws:
            assert json.loads(await ws.recv())["type"] == "state"
            async with session.post(
                f"{asgi_server.url}/api/conversations/{conversation_id}/messages/",
                json={"content": "Share this"},
            ) as response:
                assert response.status == 201
                answer = await response.json()
            text = ""
            while (frame := json.loads(await ws.recv()))["type"] != "generation.end":
                if frame["type"] == "delta":
                    text += frame["content"]
    assert text == answer["content"] == "Shared between the API and the socket."
