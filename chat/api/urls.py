"""URLs of the REST API, included under ``api/``."""

from django.urls import path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView
from rest_framework.routers import SimpleRouter

from . import sse, views

router = SimpleRouter()
router.register("conversations", views.ConversationViewSet, basename="conversation")
router.register("tokens", views.ApiTokenViewSet, basename="token")

app_name = "api"

urlpatterns = [
    path("conversations/<uuid:conversation_id>/messages/", sse.conversation_messages,
         name="conversation-messages"),
    path("conversations/<uuid:conversation_id>/export", views.ExportView.as_view(),
         name="conversation-export"),
    path("conversations/<uuid:conversation_id>/stop", views.StopView.as_view(),
         name="conversation-stop"),
    path("usage/", views.UsageView.as_view(), name="usage"),
    *router.urls,
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="api:schema"), name="docs"),
    path("redoc/", SpectacularRedocView.as_view(url_name="api:schema"), name="redoc"),
]
