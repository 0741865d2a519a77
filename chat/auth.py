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

from channels.db import database_sync_to_async
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
        user = await database_sync_to_async(ApiToken.authenticate)(key)
        scope = dict(scope, user=user or AnonymousUser())
        return await self.token_application(scope, receive, send)
