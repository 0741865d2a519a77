"""The chat WebSocket: ``ws/conversations/<uuid>/`` (protocol in README.md).

Thin on purpose: frames are validated here and handed to ``chat.generation``, which
runs the generation and publishes its frames to the conversation's group.
"""

import asyncio
import json
import logging

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from . import autostop, leases, validation
from . import generation as gen
from .layers import release_channel
from .models import Conversation

logger = logging.getLogger(__name__)

CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
# A snapshot request to another process that is not answered in this time falls back to
# the text of the last database checkpoint.
SNAPSHOT_TIMEOUT_S = 1.0
# In the executor's threads, not the one thread Channels uses for sessions and users,
# which new sockets queued behind under load (docs/scale.md).
_load_state = database_sync_to_async(gen.load_state, thread_sensitive=False)


def _owner_id(conversation_id) -> int | None:
    """The conversation's owner's id; None when it does not exist."""
    return (
        Conversation.objects.filter(id=conversation_id).values_list("owner_id", flat=True).first()
    )


_load_owner_id = database_sync_to_async(_owner_id, thread_sensitive=False)


class ChatConsumer(AsyncWebsocketConsumer):
    """One browser tab on one conversation.

    Frames from the group are held back until this socket's ``state`` frame is sent, and
    deltas already included in that state (seq <= state seq) are dropped, so a tab that
    joins mid-stream sees every character exactly once. A delta whose seq skips one (a
    group message was lost, e.g. a Redis channel over capacity) is never forwarded with
    its gap: the socket is resynchronised with a fresh ``state`` frame instead.

    Authorization (issue 9, item 1): frames are acted on only once ``connect`` found
    the user may use the conversation (its owner, or any user on an id not created yet,
    whose first message creates it for them). A refused socket (4401/4403) may still
    have frames queued behind its close; they are ignored, as are group frames. A
    socket that joined an id before it existed checks the owner on its first group
    frame, and is closed with 4403 if another user created it meanwhile. The actions
    themselves check the owner again (chat.generation: request_stop, request_snapshot,
    prepare_run).

    Every exception of a frame handler is caught at the frame boundary (``receive``):
    logged once, answered with an ``error`` frame (code ``internal``), and the socket
    stays open; no frame closes it with 1011.
    """

    generation: gen.Generation | None = None
    group: str | None = None
    authorized = False
    # The conversation did not exist when this socket connected (see above).
    _owner_unverified = False

    async def __call__(self, scope, receive, send):
        # The server may tear the application down (shutdown, crash of the connection)
        # without a clean websocket.disconnect: the run this socket started still stops.
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._cancel_own_generation("teardown")
            # After the consumer's last receive: RedisPubSubChannelLayer keeps a
            # channel subscribed whose last receive returned a message (chat.layers).
            await release_channel(
                getattr(self, "channel_layer", None), getattr(self, "channel_name", None)
            )

    # -- connection ---------------------------------------------------------------
    async def connect(self):
        user = self.scope.get("user")
        self.conversation_id = self.scope["url_route"]["kwargs"]["conversation_id"]
        # Accept first: a close before accept is an HTTP 403 and the client never sees
        # the close code that says why.
        if user is None or not user.is_authenticated:
            await self.accept()
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        self.user = user
        leases.ensure_sweeper(self.channel_layer)
        self._state_sent = False
        self._held: list[dict] = []
        # Last seq forwarded per message; None: unknown (state taken from a checkpoint).
        self._last_seq: dict[str, int | None] = {}
        # Messages final in the last state sent: late deltas of them are dropped.
        self._closed: set[str] = set()
        # generation.end already forwarded (a swept run may end twice: sweep and task).
        self._ended: set[str] = set()
        self._fallback = None
        self.repairs = 0
        # Accept before the database work: daphne drops a handshake not accepted within
        # --websocket_connect_timeout (5 s), which a busy worker reached in bench.load.
        # Frames are held until the state frame anyway.
        await self.accept()
        self.group = gen.group_name(self.conversation_id)
        # Join before reading the state so no frame published meanwhile is missed.
        await self.channel_layer.group_add(self.group, self.channel_name)
        try:
            state = await _load_state(user, self.conversation_id)
        except gen.Forbidden:
            await self.channel_layer.group_discard(self.group, self.channel_name)
            self.group = None
            await self.close(code=CLOSE_FORBIDDEN)
            return
        self._state = state
        self.authorized = True
        self._owner_unverified = state["conversation"] is None
        if state["streaming"] is None:
            await self._send_state(None)
            return
        snapshot = await gen.request_snapshot(
            self.conversation_id, self.channel_name, user_id=self.user.id
        )
        if snapshot is not None:
            await self._send_state(snapshot)
        else:
            self._fallback = asyncio.ensure_future(self._snapshot_fallback())

    async def _snapshot_fallback(self):
        await asyncio.sleep(SNAPSHOT_TIMEOUT_S)
        if self._state_sent:
            return
        # The owning process did not answer: it died, or the run ended meanwhile. The
        # database has the final text then, or at least the last checkpoint.
        self._state = await _load_state(
            self.user, self.conversation_id
        )
        if self._state_sent:
            return
        streaming = self._state["streaming"]
        await self._send_state(
            None if streaming is None
            else {"message_id": streaming["id"], "content": streaming["content"], "seq": None}
        )
        if streaming is not None:
            # The run is still streaming somewhere (a busy process) or its process died
            # (the lease will end it): the tab shows the checkpoint, deltas of unknown
            # position are dropped, and a real snapshot is asked for again.
            await self._resync()

    async def generation_snapshot(self, event):
        if self.authorized and not self._state_sent:
            await self._send_state(event["generation"])

    async def _send_state(self, generation):
        state = self._state
        self._closed = {m["id"] for m in state["messages"] if m["status"] != "streaming"}
        if generation is not None:
            self._last_seq[generation["message_id"]] = generation["seq"]
            for message in state["messages"]:
                if message["id"] == generation["message_id"]:
                    message["content"] = generation["content"]
        await self.send_json(
            {
                "type": "state",
                "conversation": state["conversation"],
                "messages": state["messages"],
                "generation": generation,
            }
        )
        self._state_sent = True
        held, self._held = self._held, []
        for index, frame in enumerate(held):
            if not self._state_sent:
                # A gap among the held frames started another resync: keep the rest.
                self._held.extend(held[index:])
                break
            await self._forward(frame)

    async def disconnect(self, code):
        if getattr(self, "_fallback", None) is not None:
            self._fallback.cancel()
        # Cancel first: the upstream stream is closed without waiting for the layer.
        self._cancel_own_generation("disconnect")
        if self.group:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    def _cancel_own_generation(self, reason):
        if self.generation is not None:
            self.generation.cancel(reason)

    async def _refuse(self, frame: dict | None = None) -> None:
        """Someone else owns the conversation (created after this socket connected to
        its id): send ``frame`` (a ``forbidden`` error), leave the group, close 4403;
        later frames are ignored."""
        self.authorized = False
        if frame is not None:
            await self.send_json(frame)
        if self.group:
            await self.channel_layer.group_discard(self.group, self.channel_name)
            self.group = None
        await self.close(code=CLOSE_FORBIDDEN)

    # -- client frames ------------------------------------------------------------
    async def receive(self, text_data=None, bytes_data=None):
        """One client frame: ignored unless authorized; any failure answered with an
        ``error`` frame, never a close."""
        if not self.authorized:
            return
        try:
            await self.handle_frame(text_data, bytes_data)
        except gen.Forbidden as exc:
            await self._refuse(exc.to_frame())
        except gen.GenerationError as exc:
            await self.send_json(exc.to_frame())
        except validation.TextRejected as exc:
            await self.send_error(exc.code, exc.message)
        except Exception:
            logger.exception(
                "frame failed on %s (conversation %s)", self.channel_name, self.conversation_id
            )
            await self.send_error("internal", "The server failed to handle this frame.")

    async def handle_frame(self, text_data=None, bytes_data=None):
        """Parse, validate and dispatch one frame of an authorized socket. Raises
        GenerationError and validation.TextRejected for the client's mistakes."""
        if text_data is None:
            return await self.send_error("bad_frame", "Frames must be JSON text.")
        if len(text_data) > settings.CHAT_MAX_MESSAGE_CHARS * 4 + 1024:
            return await self.send_error("too_large", "The frame is too large.")
        try:
            frame = json.loads(text_data)
        except RecursionError:
            return await self.send_error("bad_json", "The frame is nested too deeply.")
        except ValueError:
            return await self.send_error("bad_json", "The frame is not valid JSON.")
        if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
            return await self.send_error("bad_frame", 'A frame is an object with a "type".')
        handler = {
            "message": self.on_message,
            "stop": self.on_stop,
            "regenerate": self.on_regenerate,
            "edit": self.on_edit,
            "sync": self.on_sync,
        }.get(frame["type"])
        if handler is None:
            return await self.send_error("unknown_type", f"Unknown frame type {frame['type']!r}.")
        await handler(frame)

    async def on_message(self, frame):
        limit = settings.CHAT_MAX_MESSAGE_CHARS
        content = validation.clean_text(frame.get("content"), max_chars=limit)
        create = {}
        for key in ("model", "system_prompt"):
            value = frame.get(key)
            if value is not None:
                value = validation.clean_text(value, max_chars=limit, required=False, name=key)
            create[key] = value
        # Automatic stops of a conversation this message creates (used then only, like
        # the model), checked on every message: a bad value is always an `invalid` error.
        create.update(autostop.conversation_fields(frame))
        await self._start(content, "message", create)

    async def on_regenerate(self, frame):
        await self._start(None, "regenerate")

    async def on_edit(self, frame):
        content = validation.clean_text(
            frame.get("content"), max_chars=settings.CHAT_MAX_MESSAGE_CHARS
        )
        await self._start(content, "edit")

    async def _start(self, content, mode, create=None):
        self.generation = await gen.start_generation(
            self.user, self.conversation_id, content, mode=mode, create=create,
            layer=self.channel_layer,
        )
        # prepare_run checked the owner (it created the conversation for this user, or
        # found it theirs): the group frames that follow need no check.
        self._owner_unverified = False

    async def on_stop(self, frame):
        await gen.request_stop(
            self.conversation_id, user_id=self.user.id, reason="stop", layer=self.channel_layer
        )

    async def on_sync(self, frame):
        """Resend the ``state`` frame (a client that detected a gap in seq asks this)."""
        await self._resync()

    async def _resync(self):
        """Send a fresh ``state`` frame: group frames are held from now until it is sent,
        then forwarded after it (those it already includes dropped)."""
        self._state_sent = False
        if self._fallback is not None and self._fallback is not asyncio.current_task():
            self._fallback.cancel()
        self._state = await _load_state(
            self.user, self.conversation_id
        )
        if self._state["streaming"] is None:
            return await self._send_state(None)
        self._last_seq.clear()
        snapshot = await gen.request_snapshot(
            self.conversation_id, self.channel_name, user_id=self.user.id
        )
        if snapshot is not None:
            await self._send_state(snapshot)
        else:
            self._fallback = asyncio.ensure_future(self._snapshot_fallback())

    # -- group frames -------------------------------------------------------------
    async def chat_frame(self, event):
        if not self.authorized:
            return
        frame = event["frame"]
        if not self._state_sent:
            self._held.append(frame)
            return
        await self._forward(frame)

    async def _forward(self, frame):
        if not self.authorized:
            return
        if self._owner_unverified:
            owner_id = await _load_owner_id(self.conversation_id)
            if owner_id is None:
                return  # deleted again: nothing of it to show
            if owner_id != self.user.id:
                return await self._refuse(
                    gen.Forbidden("This conversation belongs to someone else.").to_frame()
                )
            self._owner_unverified = False
        if frame["type"] == "delta":
            message_id = frame["message_id"]
            if message_id in self._closed:
                return
            last = self._last_seq.get(message_id, 0)
            if last is None:
                # Position unknown (state from a checkpoint): a resync is under way and
                # its state will include this text.
                return
            if frame["seq"] <= last:
                return
            if frame["seq"] > last + 1:
                # A group message was lost between the generation and this socket:
                # repair from the source instead of showing text with a hole.
                self.repairs += 1
                logger.warning(
                    "seq gap on %s (%s after %s): resynchronising %s",
                    message_id, frame["seq"], last, self.channel_name,
                )
                self._held.append(frame)
                return await self._resync()
            self._last_seq[message_id] = frame["seq"]
        if frame["type"] == "generation.end":
            if frame["message_id"] in self._ended:
                return
            self._ended.add(frame["message_id"])
        await self.send_json(frame)
        if frame["type"] == "generation.end" and frame["status"] == "interrupted":
            # Finished by a lease sweep, not by the process that streamed it: the saved
            # text is the last checkpoint, which this socket may not match exactly.
            await self._resync()

    # -- helpers ------------------------------------------------------------------
    async def send_json(self, payload):
        await self.send(text_data=json.dumps(payload))

    async def send_error(self, code, detail):
        await self.send_json({"type": "error", "code": code, "detail": detail})
