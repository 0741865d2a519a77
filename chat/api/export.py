"""``/api/conversations/{id}/export``: a conversation's visible transcript as a JSON or
Markdown download."""

from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import exceptions
from rest_framework.generics import get_object_or_404
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.response import Response
from rest_framework.views import APIView

from ..models import Conversation
from . import renderers, serializers
from .views import BAD_REQUEST, CONVERSATION_ID, FORBIDDEN, NOT_FOUND, UNAUTHENTICATED


class ExportNegotiation(DefaultContentNegotiation):
    """The transcript format comes from ``?format=`` only (default json); an unknown
    format is a 400 naming the choices, not DRF's 404."""

    def select_renderer(self, request, renderers, format_suffix=None):
        wanted = request.query_params.get("format", "json")
        for renderer in renderers:
            if renderer.format == wanted:
                return renderer, renderer.media_type
        choices = ", ".join(r.format for r in renderers)
        raise exceptions.ValidationError({"format": [f"Choose one of: {choices}."]})


class ExportView(APIView):
    """``/api/conversations/{id}/export``: the visible transcript as a JSON or Markdown
    attachment (MarkdownRenderer), chosen by ``?format=`` (ExportNegotiation)."""

    renderer_classes = [renderers.ExportJSONRenderer, renderers.MarkdownRenderer]
    content_negotiation_class = ExportNegotiation

    def handle_exception(self, exc):
        # Errors are JSON whatever format the transcript was asked in.
        self.request.accepted_renderer = renderers.ExportJSONRenderer()
        self.request.accepted_media_type = "application/json"
        return super().handle_exception(exc)

    @extend_schema(
        summary="Export a conversation",
        description="The visible transcript as a download (`Content-Disposition: "
        "attachment`): JSON (`format=json`, the default) or Markdown "
        "(`format=markdown`).",
        parameters=[
            CONVERSATION_ID,
            OpenApiParameter("format", OpenApiTypes.STR, enum=["json", "markdown"],
                             default="json", description="File format."),
        ],
        responses={
            (200, "application/json"): serializers.ExportSerializer,
            (200, "text/markdown"): OpenApiResponse(OpenApiTypes.STR,
                                                    description="Markdown transcript."),
            (400, "application/json"): BAD_REQUEST,
            (404, "application/json"): NOT_FOUND,
            (401, "application/json"): UNAUTHENTICATED,
            (403, "application/json"): FORBIDDEN,
        },
    )
    def get(self, request, conversation_id):
        conversation = get_object_or_404(
            Conversation.objects.for_user(request.user), id=conversation_id
        )
        messages = conversation.messages.visible().select_related("usage").order_by(
            "created_at", "id"
        )
        data = serializers.ExportSerializer(
            {"conversation": conversation, "messages": messages, "exported_at": timezone.now()}
        ).data
        extension = {"json": "json", "markdown": "md"}[request.accepted_renderer.format]
        filename = f"conversation-{conversation.id}.{extension}"
        return Response(
            data, headers={"Content-Disposition": f'attachment; filename="{filename}"'}
        )


