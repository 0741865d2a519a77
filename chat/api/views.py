"""REST API views: thin DRF views over the models' querysets and chat.generation.

Every queryset starts from ``for_user(request.user)``, so another user's objects are
simply not found (404, never their data), and anonymous requests are refused by the
default ``IsAuthenticated`` permission (401 with ``WWW-Authenticate: Token``).
The post-message endpoint is an async view (chat.api.sse); ConversationMessagesView
documents it and serves its GET.
"""

from asgiref.sync import async_to_sync
from django.conf import settings
from django.db import transaction
from django.db.models import Count, Q, Sum, Value
from django.db.models.functions import Coalesce, TruncDate
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiExample,
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_view,
)
from rest_framework import exceptions, generics, mixins, status, viewsets
from rest_framework.generics import get_object_or_404
from rest_framework.pagination import CursorPagination
from rest_framework.response import Response
from rest_framework.views import APIView

from .. import generation as gen
from ..generation import frames
from ..models import ApiToken, Conversation, Message, UsageRecord
from . import filters, renderers, serializers

# --- shared documentation ---------------------------------------------------------------
ERROR = serializers.ErrorSerializer
UNAUTHENTICATED = OpenApiResponse(ERROR, description="No or invalid credentials.")
FORBIDDEN = OpenApiResponse(
    ERROR, description="Session authentication without a valid CSRF token."
)
NOT_FOUND = OpenApiResponse(
    ERROR, description="No such object among yours (another user's answers 404 too)."
)
BAD_REQUEST = OpenApiResponse(
    serializers.VALIDATION_ERROR_SCHEMA, description="Invalid input; the body names the fields."
)
AUTH_ERRORS = {401: UNAUTHENTICATED, 403: FORBIDDEN}
# OpenAPI 3.0 describes an event stream by the schema of one event.
SSE_EVENT_SCHEMA = {
    "type": "object",
    "description": "One server-sent event: `event` is the frame type, `data` the frame "
    "(as in the WebSocket protocol) as JSON text.",
    "properties": {
        "event": {"type": "string",
                  "enum": ["message", "generation.start", "delta", "generation.end"]},
        "data": {"type": "string", "description": "The frame as JSON."},
    },
    "required": ["event", "data"],
}
CONVERSATION_ID = OpenApiParameter(
    "conversation_id", OpenApiTypes.UUID, OpenApiParameter.PATH,
    description="Id of one of your conversations.",
)


class Conflict(exceptions.APIException):
    """409 with body ``{"detail", "code": "busy"}``, as the post-message endpoint."""

    status_code = status.HTTP_409_CONFLICT

    def __init__(self, detail: str, code: str = "busy"):
        super().__init__({"detail": detail, "code": code})


class StrictCursorPagination(CursorPagination):
    """Cursor pagination whose ``page_size`` is an integer from 1 to ``max_page_size``
    (400 otherwise, where DRF would silently use the default)."""

    page_size_query_param = "page_size"

    def get_page_size(self, request):
        raw = request.query_params.get(self.page_size_query_param)
        if raw is None:
            return self.page_size
        try:
            size = int(raw)
        except ValueError:
            size = 0
        if not 1 <= size <= self.max_page_size:
            raise exceptions.ValidationError(
                {"page_size": [f"An integer from 1 to {self.max_page_size}."]}
            )
        return size

    def get_schema_operation_parameters(self, view):
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            if parameter["name"] == self.page_size_query_param:
                parameter["schema"].update(minimum=1, maximum=self.max_page_size)
        return parameters


class ConversationPagination(StrictCursorPagination):
    """Newest activity first; ``updated_at`` ties broken by id so every conversation is
    listed exactly once across pages."""

    ordering = ("-updated_at", "-id")
    page_size = 20
    max_page_size = 100


class MessagePagination(StrictCursorPagination):
    """Oldest first, as the conversation reads; newest first with ``before`` (the page
    just before a message: what a client shows above what it has)."""

    ordering = ("created_at", "id")
    page_size = 50
    max_page_size = 200

    def get_ordering(self, request, queryset, view):
        if request.query_params.get("before") is not None:
            return ("-created_at", "-id")
        return super().get_ordering(request, queryset, view)


# --- conversations ------------------------------------------------------------------------
@extend_schema_view(
    list=extend_schema(
        summary="List your conversations",
        description="Newest activity first, cursor-paginated (follow `next`).",
        responses={200: serializers.ConversationSerializer(many=True), 400: BAD_REQUEST,
                   404: OpenApiResponse(ERROR, description="Invalid cursor."), **AUTH_ERRORS},
    ),
    create=extend_schema(
        summary="Create a conversation",
        description="All fields optional; `model` must be one the server allows.",
        responses={201: serializers.ConversationSerializer, 400: BAD_REQUEST, **AUTH_ERRORS},
    ),
    retrieve=extend_schema(
        summary="Get a conversation",
        responses={200: serializers.ConversationSerializer, 404: NOT_FOUND, **AUTH_ERRORS},
    ),
    partial_update=extend_schema(
        summary="Change title, model or system prompt",
        responses={200: serializers.ConversationSerializer, 400: BAD_REQUEST,
                   404: NOT_FOUND, **AUTH_ERRORS},
    ),
    destroy=extend_schema(
        summary="Delete a conversation and its messages",
        description="Usage records are kept (the audit trail) with their conversation "
        "reference cleared. 409 while a generation is running: stop it first.",
        responses={204: None, 404: NOT_FOUND,
                   409: OpenApiResponse(ERROR, description="A generation is running."),
                   **AUTH_ERRORS},
    ),
)
class ConversationViewSet(viewsets.ModelViewSet):
    """``/api/conversations/``: list (filters in ConversationFilter), create, read,
    PATCH, delete. PUT is not offered: every field is optional, PATCH says it all."""

    serializer_class = serializers.ConversationSerializer
    pagination_class = ConversationPagination
    filterset_class = filters.ConversationFilter
    lookup_url_kwarg = "conversation_id"
    # Any segment: an id that is not a UUID is a JSON 404 from the view (DRF's
    # get_object_or_404), not Django's HTML page for an unresolved URL.
    lookup_value_regex = "[^/]+"
    http_method_names = ["get", "post", "patch", "delete", "head", "options"]

    def get_queryset(self):
        return Conversation.objects.for_user(self.request.user)

    def perform_create(self, serializer):
        now = timezone.now()
        serializer.save(
            owner=self.request.user, created_at=now, updated_at=now,
            model=serializer.validated_data.get("model") or settings.CHAT_MODEL,
        )

    def perform_update(self, serializer):
        conversation = serializer.save()
        # Other open tabs of this conversation show the new title/model/prompt at once.
        async_to_sync(gen.send_to_group)(
            conversation.id, frames.conversation_changed(conversation.to_dict())
        )

    def perform_destroy(self, instance):
        conversation_id = instance.id
        with transaction.atomic():
            gen.finish_stale(conversation_id=instance.id)
            if instance.messages.streaming().exists():
                raise Conflict("A generation is running; stop it first.")
            instance.delete()
        async_to_sync(gen.send_to_group)(
            conversation_id, frames.conversation_deleted(conversation_id)
        )


# --- messages ---------------------------------------------------------------------------
class ConversationMessagesView(generics.ListAPIView):
    """GET lists the visible messages; POST (served by chat.api.sse.post_message, an
    async view, because it waits on or streams a generation) is documented here."""

    serializer_class = serializers.MessageSerializer
    pagination_class = MessagePagination
    filter_backends = []

    def get_renderers(self):
        # Only the POST may answer text/event-stream.
        found = super().get_renderers()
        if self.request is not None and self.request.method == "POST":
            found.append(renderers.EventStreamRenderer())
        return found

    def get_conversation(self) -> Conversation:
        return get_object_or_404(
            Conversation.objects.for_user(self.request.user), id=self.kwargs["conversation_id"]
        )

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return Message.objects.none()
        return filters.messages_before(self.get_conversation().messages,
                                       self.request.query_params.get("before"))

    @extend_schema(
        summary="List the messages of a conversation",
        description="Visible messages (what the user saw; answers replaced by a "
        "regenerate or an edit are left out), oldest first, cursor-paginated. With "
        "`before`: the messages before that one, **newest first** (follow `next` for "
        "older ones): what the chat page loads above the latest ones its WebSocket "
        "`state` frame carried (`has_more`).",
        parameters=[CONVERSATION_ID, OpenApiParameter(
            "before", OpenApiTypes.UUID,
            description="Id of a message of this conversation: list only the visible "
            "messages before it, newest first.")],
        responses={200: serializers.MessageSerializer(many=True), 400: BAD_REQUEST,
                   404: OpenApiResponse(ERROR, description="Not your conversation, an "
                                        "invalid cursor, or `before` not one of its "
                                        "messages."),
                   **AUTH_ERRORS},
    )
    def get(self, request, *args, **kwargs):
        return super().get(request, *args, **kwargs)

    @extend_schema(
        summary="Send a message and get the answer",
        description=(
            "Saves the user message and starts a generation, exactly as the WebSocket "
            "`message` frame does (its frames also reach every open socket of the "
            "conversation).\n\n"
            "* Without `Accept: text/event-stream`: waits for the end of the generation "
            "and answers 201 with the assistant message (its `status` says whether it "
            "completed or failed).\n"
            "* With `Accept: text/event-stream`: answers 200 and streams server-sent "
            "events `message`, `generation.start`, `delta` (many) and "
            "`generation.end`, each `event: <type>` + `data: <the WebSocket frame as "
            "JSON>`. Closing the connection stops the generation and closes the "
            "upstream stream; the partial answer is saved as `cancelled` with its "
            "usage."
        ),
        parameters=[CONVERSATION_ID],
        request=serializers.PostMessageSerializer,
        responses={
            (201, "application/json"): serializers.MessageSerializer,
            (200, "text/event-stream"): OpenApiResponse(
                SSE_EVENT_SCHEMA, description="Server-sent events until generation.end."
            ),
            400: BAD_REQUEST,
            404: NOT_FOUND,
            409: OpenApiResponse(ERROR, description="A generation is already running in "
                                 "this conversation (code `busy`)."),
            429: OpenApiResponse(ERROR, description="Budget exhausted (code "
                                 "`quota_exceeded`) or too many generations running at "
                                 "once (code `concurrency_limit`)."),
            503: OpenApiResponse(ERROR, description="This server is past its capacity and "
                                 "refuses new generations for now (code `overloaded`, "
                                 "`retry_after_ms`; header `Retry-After`, in s). Nothing "
                                 "was saved: send the same message again later."),
            **AUTH_ERRORS,
        },
        examples=[OpenApiExample("message", value={"content": "Explain HTTP/2 briefly."},
                                 request_only=True)],
    )
    def post(self, request, *args, **kwargs):
        # Never reached: the URL's async view handles POST itself (chat.api.sse).
        raise exceptions.MethodNotAllowed("POST")


class ConversationMessageView(generics.RetrieveAPIView):
    """``/api/conversations/{id}/messages/{message_id}/``: one message, whole (a
    WebSocket ``state`` frame may carry a large one cut, ``truncated``)."""

    serializer_class = serializers.MessageSerializer

    def get_object(self):
        conversation = get_object_or_404(
            Conversation.objects.for_user(self.request.user), id=self.kwargs["conversation_id"]
        )
        return get_object_or_404(conversation.messages.select_related("usage"),
                                 id=self.kwargs["message_id"])

    @extend_schema(
        summary="Get one message",
        description="One message of one of your conversations, whole (also one "
        "replaced by a regenerate or an edit); a streaming answer's text as of its "
        "last checkpoint.",
        parameters=[CONVERSATION_ID, OpenApiParameter(
            "message_id", OpenApiTypes.UUID, OpenApiParameter.PATH,
            description="Id of a message of that conversation.")],
        responses={200: serializers.MessageSerializer, 404: NOT_FOUND, **AUTH_ERRORS},
    )
    def get(self, request, *args, **kwargs):
        return super().get(request, *args, **kwargs)


# --- stop -------------------------------------------------------------------------------
class StopView(APIView):
    """``/api/conversations/{id}/stop``: ``chat.generation.request_stop`` for the
    conversation's streaming message, in whichever process runs it."""

    @extend_schema(
        summary="Stop the running generation",
        description="Stops the conversation's running generation wherever it runs (this "
        "process, another one, a WebSocket or an HTTP request); the upstream stream is "
        "closed and the partial answer saved as `cancelled`. `running` is false when "
        "nothing was running.",
        parameters=[CONVERSATION_ID],
        request=None,
        responses={200: serializers.StopSerializer, 404: NOT_FOUND, **AUTH_ERRORS},
    )
    def post(self, request, conversation_id):
        conversation = get_object_or_404(
            Conversation.objects.for_user(request.user), id=conversation_id
        )
        streaming = conversation.messages.streaming().first()
        if streaming is not None:
            # Sync views run in a worker thread under ASGI; async_to_sync runs this on
            # the server's event loop, where a local generation's task lives.
            async_to_sync(gen.request_stop)(
                conversation.id, user_id=request.user.id, reason="stop"
            )
        return Response(
            {"running": streaming is not None, "message_id": streaming.id if streaming else None}
        )


# --- usage ------------------------------------------------------------------------------
class UsageView(APIView):
    """``/api/usage/``: sums over the user's UsageRecords (tokens, USD, runs), which
    outlive deleted conversations."""

    @extend_schema(
        summary="Your usage totals",
        description="Tokens, cost (USD) and number of runs (and of stopped runs) of your "
        "generations, in total and grouped by UTC day (newest first) or by model. "
        "Runs of deleted conversations still count.",
        parameters=[
            serializers.UsageQuerySerializer,
            OpenApiParameter("since", OpenApiTypes.DATETIME,
                             description="Only runs started at or after this (ISO 8601)."),
        ],
        responses={200: serializers.UsageReportSerializer, 400: BAD_REQUEST, **AUTH_ERRORS},
    )
    def get(self, request):
        # A plain dict, not the QueryDict: DRF reads an empty form value as "absent"
        # (default), while the schema says `group_by=` is not one of the choices.
        query = serializers.UsageQuerySerializer(data=request.query_params.dict())
        query.is_valid(raise_exception=True)
        group_by = query.validated_data["group_by"]
        filterset = filters.UsageFilter(
            request.query_params, queryset=UsageRecord.objects.for_user(request.user)
        )
        if not filterset.is_valid():
            raise exceptions.ValidationError(filterset.errors)
        records = filterset.qs.order_by()
        sums = {
            "prompt_tokens": Coalesce(Sum("prompt_tokens"), Value(0)),
            "completion_tokens": Coalesce(Sum("completion_tokens"), Value(0)),
            "total_tokens": Coalesce(Sum("total_tokens"), Value(0)),
            "cost_usd": Sum("cost_usd"),
            "runs": Count("id"),
            "stopped_runs": Count("id", filter=Q(status=Message.Status.CANCELLED)),
        }
        totals = records.aggregate(**sums)
        if group_by == "day":
            rows = (records.annotate(key=TruncDate("created_at")).values("key")
                    .annotate(**sums).order_by("-key"))
        else:
            rows = (records.annotate(key=Coalesce("model", Value(""))).values("key")
                    .annotate(**sums).order_by("-total_tokens", "key"))
        groups = [{**row, "key": str(row["key"]), "cost_usd": row["cost_usd"] or 0}
                  for row in rows]
        data = {
            "group_by": group_by,
            "since": filterset.form.cleaned_data.get("since"),
            "totals": {**totals, "cost_usd": totals["cost_usd"] or 0},
            "groups": groups,
        }
        return Response(serializers.UsageReportSerializer(data).data)


# --- tokens -------------------------------------------------------------------------------
@extend_schema_view(
    list=extend_schema(summary="List your API tokens",
                       responses={200: serializers.ApiTokenSerializer(many=True),
                                  **AUTH_ERRORS}),
    create=extend_schema(
        summary="Create an API token",
        description="The answer holds the key, shown this once; send it as "
        "`Authorization: Token <key>` (REST API and WebSocket).",
        request=serializers.ApiTokenSerializer,
        responses={201: serializers.NewApiTokenSerializer, 400: BAD_REQUEST, **AUTH_ERRORS},
    ),
    destroy=extend_schema(summary="Revoke an API token",
                          responses={204: None, 404: NOT_FOUND, **AUTH_ERRORS}),
)
class ApiTokenViewSet(
    mixins.ListModelMixin, mixins.CreateModelMixin, mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    """``/api/tokens/``: the user's personal API tokens (chat.models.ApiToken)."""

    serializer_class = serializers.ApiTokenSerializer
    pagination_class = None
    filter_backends = []
    lookup_value_regex = "[^/]+"

    def get_queryset(self):
        return ApiToken.objects.for_user(self.request.user)

    def create(self, request, *args, **kwargs):
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        token, key = ApiToken.issue(request.user, serializer.validated_data["name"])
        token.key = key
        # The key is in this answer only: no browser or proxy cache may keep it.
        return Response(
            serializers.NewApiTokenSerializer(token).data, status=status.HTTP_201_CREATED,
            headers={"Cache-Control": "no-store"},
        )
