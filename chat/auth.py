"""Personal API tokens on the WebSocket: ``Authorization: Token <key>``.

Browsers authenticate the socket with the session cookie, which they send on their own
to any page's socket; that is why the cookie path stays behind
:class:`SameOriginValidator` (a page of another origin cannot open a socket as the
user). Scripts send no ``Origin`` header, which that validator refuses. A token is not
ambient (a browser never adds an ``Authorization`` header to a WebSocket handshake), so
a connection that presents one needs no Origin check: :class:`TokenAuthMiddleware`
routes it to the application with ``scope["user"]`` set from the token, and every
other connection to the cookie stack.
"""

from __future__ import annotations

from urllib.parse import urlparse

from channels import auth as channels_auth
from channels.auth import AuthMiddleware
from channels.db import database_sync_to_async
from channels.security.websocket import OriginValidator
from channels.sessions import CookieMiddleware, SessionMiddleware
from django.conf import settings
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
# per query) the handshakes queued behind each other, and the last sockets of a burst
# connected seconds late. Both loads are self-contained queries;
# ``database_sync_to_async`` closes old connections around each call in whichever
# thread runs it.
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


# Hosts Channels' AllowedHostsOriginValidator accepts with DEBUG on and ALLOWED_HOSTS empty.
_DEBUG_HOSTS = ["localhost", "127.0.0.1", "[::1]"]


def _header(scope, name: bytes) -> str | None:
    value = None
    for header, content in scope.get("headers", []):
        if header == name:
            value = content.decode("latin-1")
    return value


def _site_scheme(scope) -> str:
    """``https`` or ``http``: how the page that opens this socket was served. HTTPS=1
    serves every page over HTTPS; behind a TLS-terminating proxy its
    ``SECURE_PROXY_SSL_HEADER`` says so (the rule Django applies to HTTP requests);
    else the socket's own scheme (``wss`` -> ``https``; the ASGI spec's default is
    ``ws``, and daphne sets none)."""
    if getattr(settings, "HTTPS", False) or scope.get("scheme") == "wss":
        return "https"
    proxy_header = settings.SECURE_PROXY_SSL_HEADER
    if proxy_header:
        name, secure_value = proxy_header
        name = name.removeprefix("HTTP_").lower().replace("_", "-").encode("latin-1")
        if (_header(scope, name) or "").split(",")[0].strip() == secure_value:
            return "https"
    return "http"


def _channels_pattern(origin: str) -> str:
    """A ``CSRF_TRUSTED_ORIGINS`` entry in Channels' pattern syntax: Django writes a
    subdomain wildcard ``https://*.example.com``, Channels ``https://.example.com``."""
    return origin.replace("://*.", "://.", 1)


class SameOriginValidator:
    """ASGI middleware: a WebSocket handshake goes on only when its ``Origin`` is one
    the site is served from, compared by scheme, host and port (RFC 6454 origins):

    - the socket's own origin: the scheme the site is served with (see _site_scheme)
      and the ``Host`` header, host and port, provided that host is allowed by
      ``ALLOWED_HOSTS`` (so a page of a rebound DNS name is refused, as Django refuses
      its HTTP requests); or
    - one of ``CSRF_TRUSTED_ORIGINS`` (Django's list of other origins allowed to post
      forms here, e.g. ``https://chat.example.com`` behind a proxy that rewrites Host).

    Anything else, and a missing ``Origin``, is refused with HTTP 403 by Channels'
    ``OriginValidator`` (which does the matching). Channels'
    ``AllowedHostsOriginValidator`` compares the host only: ``http://host:1`` passed
    for a site served at ``https://host``.
    """

    def __init__(self, application):
        self.application = application

    async def __call__(self, scope, receive, send):
        allowed = [_channels_pattern(origin) for origin in settings.CSRF_TRUSTED_ORIGINS]
        own = self.own_origin(scope)
        if own is not None:
            allowed.append(own)
        return await OriginValidator(self.application, allowed)(scope, receive, send)

    @staticmethod
    def own_origin(scope) -> str | None:
        """``scheme://host[:port]`` of the site this socket was opened on, or None when
        the ``Host`` header is missing or names a host ``ALLOWED_HOSTS`` refuses."""
        host = (_header(scope, b"host") or "").strip().lower()
        if not host or "/" in host or "@" in host:
            return None
        origin = f"{_site_scheme(scope)}://{host}"
        hosts = settings.ALLOWED_HOSTS or (_DEBUG_HOSTS if settings.DEBUG else [])
        try:
            parsed = urlparse(origin)
            parsed.port  # noqa: B018 - raises ValueError for a port that is no number
        except ValueError:
            return None
        if not OriginValidator(None, hosts).valid_origin(parsed):
            return None
        return origin
