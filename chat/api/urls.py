"""URLs of the REST API, included under ``api/``."""

from django.urls import path
from rest_framework.routers import SimpleRouter

from . import export, schema, sse, views

router = SimpleRouter()
router.register("conversations", views.ConversationViewSet, basename="conversation")
router.register("tokens", views.ApiTokenViewSet, basename="token")

app_name = "api"

# Ids are matched as any segment and checked by the views, so a malformed id answers
# the documented JSON 404 rather than Django's HTML "page not found".

urlpatterns = [
    path("conversations/<str:conversation_id>/messages/", sse.conversation_messages,
         name="conversation-messages"),
    path("conversations/<str:conversation_id>/messages/<str:message_id>/",
         views.ConversationMessageView.as_view(), name="conversation-message"),
    path("conversations/<str:conversation_id>/export", export.ExportView.as_view(),
         name="conversation-export"),
    path("conversations/<str:conversation_id>/stop", views.StopView.as_view(),
         name="conversation-stop"),
    path("usage/", views.UsageView.as_view(), name="usage"),
    *router.urls,
    path("schema/", schema.SchemaView.as_view(), name="schema"),
    path("docs/", schema.SwaggerView.as_view(), name="docs"),
    path("redoc/", schema.RedocView.as_view(), name="redoc"),
]
