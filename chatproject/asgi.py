"""ASGI entry point: HTTP through Django, WebSockets through Channels.

``get_asgi_application()`` runs before anything imports models (the routing does), so
the app registry is ready, as the Channels tutorial requires.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatproject.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from chat.auth import (  # noqa: E402
    AuthMiddlewareStack,
    SameOriginValidator,
    TokenAuthMiddleware,
)
from chat.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        # Scripts with an `Authorization: Token` header skip the Origin check (a token
        # is not ambient, unlike the cookie); browsers keep it: scheme, host and port
        # of the Origin must be the site's own (chat/auth.py).
        "websocket": TokenAuthMiddleware(
            SameOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
            token_application=URLRouter(websocket_urlpatterns),
        ),
    }
)
