from django.urls import path

from . import token_views, views

app_name = "chat"

urlpatterns = [
    path("", views.index, name="index"),
    path("c/<uuid:conversation_id>/", views.conversation, name="conversation"),
    path("settings/tokens/", token_views.tokens, name="tokens"),
]
