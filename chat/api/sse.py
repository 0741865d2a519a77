"""``/api/conversations/{id}/messages/``: GET through DRF, POST as an async view.

POST starts a generation through chat.generation (the module the WebSocket uses) and
either waits for its end or streams its frames as server-sent events. It must be async:
the generation is an asyncio task of the server's event loop, and a sync view would
hold a worker thread for the whole answer.

DRF views are sync, so the POST runs DRF's own machinery (authentication with CSRF for
sessions, permissions, content negotiation, parsing, exception handling) in a thread
for the request part, then does the async part here. The URL's callback carries
``cls = ConversationMessagesView`` so drf-spectacular documents both methods.

Disconnects: when the HTTP client goes away, Django's ASGI handler cancels the task
that iterates the streaming response (or awaits the view); the generator's ``finally``
then calls ``Generation.cancel("disconnect")``, which is what a WebSocket disconnect
does, so the upstream HTTP stream is closed and the partial answer saved as
``cancelled`` with its usage.
"""

from __future__ import annotations

import asyncio
import json

from asgiref.sync import sync_to_async
from django.http import HttpResponse, StreamingHttpResponse
from rest_framework.renderers import JSONRenderer

from .. import generation as gen
from ..generation import frames
from ..models import Message
from .renderers import EventStreamRenderer
from .serializers import MessageSerializer, PostMessageSerializer
from .views import ConversationMessagesView

# An SSE comment is sent after this many seconds without a frame, so proxies and
# clients keep an idle stream (e.g. a slow first token) open.
KEEPALIVE_S = 15.0

_list_view = ConversationMessagesView.as_view()


def json_response(data, status: int, headers: dict[str, str] | None = None) -> HttpResponse:
    """A JSON response rendered by DRF's renderer, outside a DRF view."""
    return HttpResponse(JSONRenderer().render(data), status=status,
                        content_type="application/json", headers=headers)


def sse_event(frame: dict) -> str:
    """One server-sent event: ``event: <frame type>`` and the frame as JSON data."""
    return f"event: {frame['type']}\ndata: {json.dumps(frame, ensure_ascii=False)}\n\n"


def _prepare_post(request, conversation_id):
    """Sync part of POST: authenticate, check the conversation, validate the body.

    Returns ``(user, wants_stream, content)`` or an HttpResponse with DRF's error
    (401/403/404/400/406), rendered as JSON.
    """
    view = ConversationMessagesView()
    view.args, view.kwargs = (), {"conversation_id": conversation_id}
    view.format_kwarg = None
    drf_request = view.initialize_request(request, conversation_id=conversation_id)
    view.request = drf_request
    view.headers = view.default_response_headers
    try:
        view.initial(drf_request)
        view.get_conversation()
        body = PostMessageSerializer(data=drf_request.data)
        body.is_valid(raise_exception=True)
    except Exception as exc:  # noqa: BLE001 - DRF turns its exceptions into responses
        response = view.handle_exception(exc)
        drf_request.accepted_renderer = JSONRenderer()
        drf_request.accepted_media_type = "application/json"
        response = view.finalize_response(drf_request, response)
        return response.render()
    wants_stream = isinstance(drf_request.accepted_renderer, EventStreamRenderer)
    return drf_request.user, wants_stream, body.validated_data["content"]


async def post_message(request, conversation_id):
    """``POST /api/conversations/{id}/messages/``: start a generation and answer as SSE
    (``Accept: text/event-stream``) or, once it ended, with the assistant message (201).
    Errors: 401/403 auth, 404 not the owner's, 400 invalid, 409 busy, 429 quota or
    concurrency limit, 503 overloaded (with Retry-After)."""
    prepared = await sync_to_async(_prepare_post)(request, conversation_id)
    if isinstance(prepared, HttpResponse):
        return prepared
    user, wants_stream, content = prepared
    try:
        generation, queue = await gen.start_detached(user, conversation_id, content)
    except gen.GenerationError as exc:
        return json_response({"detail": exc.detail, "code": exc.code, **exc.extra},
                             exc.http_status, exc.http_headers())
    if wants_stream:
        response = StreamingHttpResponse(
            _events(generation, queue), content_type="text/event-stream; charset=utf-8"
        )
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"  # nginx: do not buffer the stream
        return response
    try:
        await generation.wait()
    except asyncio.CancelledError:
        generation.cancel("disconnect")
        raise
    message = await Message.objects.select_related("usage").aget(id=generation.message_id)
    return json_response(MessageSerializer(message).data, 201)


async def _events(generation: gen.Generation, queue: asyncio.Queue):
    """Yield the run's frames as SSE until ``generation.end``; cancel the run if the
    iteration stops earlier (client disconnect: task cancelled, or generator closed)."""
    ended = False
    try:
        run = generation.run
        # These two were queued before we could subscribe; send them from the run.
        if run.user_message is not None:
            yield sse_event(frames.user_message(run.user_message, run.conversation))
        yield sse_event(frames.generation_start(run.assistant_message))
        while True:
            try:
                frame = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
            except TimeoutError:
                yield ": keep-alive\n\n"
                continue
            if frame["type"] in ("message", "generation.start"):
                continue
            if frame["type"] == "generation.end":
                ended = True
            yield sse_event(frame)
            if ended:
                return
    finally:
        if not ended:
            generation.cancel("disconnect")


async def conversation_messages(request, conversation_id):
    """The URL's view: POST here, every other method through DRF (in a thread)."""
    if request.method == "POST":
        return await post_message(request, conversation_id)
    return await sync_to_async(_list_view)(request, conversation_id=conversation_id)


# drf-spectacular finds API views through these attributes (as set by as_view()).
conversation_messages.cls = ConversationMessagesView
conversation_messages.initkwargs = {}
# CSRF is enforced by DRF's SessionAuthentication (as for every DRF view), so not twice.
conversation_messages.csrf_exempt = True
