"""Personal API tokens on the WebSocket: ``Authorization: Token <key>``.

Browsers authenticate the socket with the session cookie, which they send on their own
to any page's socket; that is why the cookie path stays behind Channels'
``AllowedHostsOriginValidator`` (a cross-site page cannot open a socket as the user).
Scripts send no ``Origin`` header, which that validator refuses. A token is not
ambient (a browser never adds an ``Authorization`` header to a WebSocket handshake), so
a connection that presents one needs no Origin check: :class:`TokenAuthMiddleware`
routes it to the application with ``scope["user"]`` set from the token, and every
other connection to the cookie stack.
"""

from __future__ import annotations

from channels import auth as channels_auth
from channels.auth import AuthMiddleware
from channels.db import database_sync_to_async
from channels.sessions import CookieMiddleware, SessionMiddleware
from django.contrib.auth.models import AnonymousUser

from .models import ApiToken

KEYWORD = "token"


def token_from_header(value: bytes | str | None) -> str | None:
    """The key of an ``Authorization: Token <key>`` header value; None when the header
    is absent or uses another scheme (``Bearer``, ``Basic``)."""
    if not value:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    parts = value.split()
    if len(parts) != 2 or parts[0].lower() != KEYWORD:
        return None
    return parts[1]


def _authorization(scope) -> bytes | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            return value
    return None


class TokenAuthMiddleware:
    """ASGI middleware for WebSocket connections.

    ``token_application`` gets connections with an ``Authorization: Token`` header:
    ``scope["user"]`` is the token's user, or AnonymousUser for an unknown/revoked key
    (the consumer then closes with 4401, as for any anonymous socket).
    ``session_application`` (the Origin check + cookie auth stack) gets all others.
    """

    def __init__(self, session_application, token_application):
        self.session_application = session_application
        self.token_application = token_application

    async def __call__(self, scope, receive, send):
        key = token_from_header(_authorization(scope)) if scope["type"] == "websocket" else None
        if key is None:
            return await self.session_application(scope, receive, send)
        user = await _authenticate_token(key)
        scope = dict(scope, user=user or AnonymousUser())
        return await self.token_application(scope, receive, send)


# In the executor's threads, not the one thread Channels gives sync code by default
# (``thread_sensitive=True``): every new socket's session and user were loaded there,
# one socket after another, and under load (a busy event loop, a database round trip
# per query) the handshakes queued behind each other: at K = 300 on PostgreSQL the
# last sockets of a 3 s ramp connected 9 s late (docs/performance.md). Both loads
# are self-contained queries; ``database_sync_to_async`` closes old connections around
# each call in whichever thread runs it.
_authenticate_token = database_sync_to_async(ApiToken.authenticate, thread_sensitive=False)
_get_user = database_sync_to_async(channels_auth.get_user.func, thread_sensitive=False)


class ParallelAuthMiddleware(AuthMiddleware):
    """Channels' AuthMiddleware (``scope["user"]`` from the session; AnonymousUser when
    there is none), with the user loaded in the executor's threads (see _get_user)."""

    async def resolve_scope(self, scope):
        scope["user"]._wrapped = await _get_user(scope)


def AuthMiddlewareStack(inner):  # noqa: N802 - the name Channels gives its stack
    """Channels' ``AuthMiddlewareStack`` (cookies, session, user) with
    :class:`ParallelAuthMiddleware`."""
    return CookieMiddleware(SessionMiddleware(ParallelAuthMiddleware(inner)))
