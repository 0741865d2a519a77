from django.urls import path

from . import consumers
from .metrics import CountWebSockets

websocket_urlpatterns = [
    # CountWebSockets: the chat_websocket_connections gauge (chat/metrics.py).
    path("ws/conversations/<uuid:conversation_id>/",
         CountWebSockets(consumers.ChatConsumer.as_asgi())),
]
