"""The WebSocket Origin check (chat.auth.SameOriginValidator) compares scheme, host and
port: a cookie-authenticated socket opens only from the origin the site is served from
or one of CSRF_TRUSTED_ORIGINS. Scripts with a token need no Origin at all.

Each test drives the real ASGI application (chatproject.asgi) in process.
"""

from __future__ import annotations

import json
import uuid

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator

from chat.models import ApiToken
from tests.conftest import session_cookie

pytestmark = pytest.mark.django_db(transaction=True)


async def open_socket(headers: dict[str, str], user=None):
    """Opens a socket of a new conversation with ``headers`` (and ``user``'s session
    cookie); returns (accepted, communicator)."""
    from chatproject.asgi import application

    raw = [(name.lower().encode(), value.encode()) for name, value in headers.items()]
    if user is not None:
        raw.append((b"cookie", (await sync_to_async(session_cookie)(user)).encode()))
    communicator = WebsocketCommunicator(
        application, f"/ws/conversations/{uuid.uuid4()}/", headers=raw)
    connected, _ = await communicator.connect(timeout=5)
    return connected, communicator


async def assert_opens(headers, user):
    connected, communicator = await open_socket(headers, user)
    try:
        assert connected, headers
        assert json.loads(await communicator.receive_from(timeout=5))["type"] == "state"
    finally:
        await communicator.disconnect()


async def assert_refused(headers, user):
    connected, communicator = await open_socket(headers, user)
    if connected:
        await communicator.disconnect()
    assert not connected, headers


async def test_a_page_of_the_site_itself_opens_its_socket(alice):
    await assert_opens({"Origin": "http://127.0.0.1", "Host": "127.0.0.1"}, alice)
    await assert_opens({"Origin": "http://localhost:8000", "Host": "localhost:8000"}, alice)


@pytest.mark.parametrize("origin,host", [
    ("http://127.0.0.1:1", "127.0.0.1"),           # another port, same host
    ("http://127.0.0.1:1", "127.0.0.1:8000"),
    ("http://127.0.0.1", "127.0.0.1:8000"),
    ("https://127.0.0.1", "127.0.0.1"),             # another scheme
    ("http://localhost:8000", "127.0.0.1:8000"),   # another host, also allowed
    ("https://evil.example", "127.0.0.1"),
    ("null", "127.0.0.1"),                         # a sandboxed or file: page
])
async def test_a_page_of_another_origin_is_refused_even_with_an_allowed_host(
    alice, origin, host
):
    await assert_refused({"Origin": origin, "Host": host}, alice)


async def test_a_socket_without_origin_and_without_token_is_refused(alice):
    await assert_refused({"Host": "127.0.0.1"}, alice)


async def test_a_host_outside_allowed_hosts_is_refused_even_as_its_own_origin(alice):
    """A DNS name rebound to the server: the page and the Host agree, ALLOWED_HOSTS
    does not list it."""
    await assert_refused({"Origin": "http://rebound.example", "Host": "rebound.example"},
                         alice)


async def test_a_csrf_trusted_origin_opens_its_socket(alice, settings):
    settings.CSRF_TRUSTED_ORIGINS = ["https://chat.example.com", "https://*.corp.example"]
    await assert_opens({"Origin": "https://chat.example.com", "Host": "127.0.0.1"}, alice)
    await assert_opens({"Origin": "https://eu.corp.example", "Host": "127.0.0.1"}, alice)
    await assert_refused({"Origin": "http://chat.example.com", "Host": "127.0.0.1"}, alice)
    await assert_refused({"Origin": "https://chat.example.com:8443", "Host": "127.0.0.1"},
                         alice)


async def test_with_https_on_only_the_https_origin_opens(alice, settings):
    settings.HTTPS = True
    await assert_opens({"Origin": "https://127.0.0.1", "Host": "127.0.0.1"}, alice)
    await assert_refused({"Origin": "http://127.0.0.1", "Host": "127.0.0.1"}, alice)


async def test_behind_a_tls_proxy_the_forwarded_scheme_is_the_sites(alice, settings):
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    forwarded = {"Host": "127.0.0.1", "X-Forwarded-Proto": "https"}
    await assert_opens({"Origin": "https://127.0.0.1", **forwarded}, alice)
    await assert_refused({"Origin": "http://127.0.0.1", **forwarded}, alice)
    await assert_refused({"Origin": "https://127.0.0.1", "Host": "127.0.0.1"}, alice)


async def test_a_script_with_a_token_needs_no_origin(alice):
    _, key = await sync_to_async(ApiToken.issue)(alice, "script")
    await assert_opens({"Authorization": f"Token {key}"}, None)
    # A token is not ambient: any Origin a script sends does not matter either.
    await assert_opens({"Authorization": f"Token {key}", "Origin": "http://127.0.0.1:1",
                        "Host": "127.0.0.1"}, None)
