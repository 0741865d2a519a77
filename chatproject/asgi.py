"""ASGI entry point: HTTP through Django, WebSockets through Channels.

``get_asgi_application()`` runs before anything imports models (the routing does), so
the app registry is ready, as the Channels tutorial requires.
"""

import os

from django.core.asgi import get_asgi_application

from chatproject import writethrough

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatproject.settings")
django_asgi_app = get_asgi_application()
# Socket writes skip Twisted's buffer when it is empty (two epoll calls less per
# frame; chatproject/writethrough.py, docs/performance.md).
writethrough.install()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

from chat.auth import AuthMiddlewareStack, TokenAuthMiddleware  # noqa: E402
from chat.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        # Scripts with an `Authorization: Token` header skip the Origin check (a token
        # is not ambient, unlike the cookie); browsers keep it (chat/auth.py).
        "websocket": TokenAuthMiddleware(
            AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
            token_application=URLRouter(websocket_urlpatterns),
        ),
    }
)
