"""The chat WebSocket: ``ws/conversations/<uuid>/`` (protocol in README.md).

A thin adapter: it parses and validates client frames and hands them to
``chat.generation`` (which runs generations and publishes their frames to the sockets
watching the conversation: chat.generation.fanout), and it forwards the frames of its
inbox as the socket's :class:`~chat.generation.sequencer.FrameSequencer` decides.
Frames are built by ``chat.generation.frames`` only.
"""

import asyncio
import functools
import logging

from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from channels.layers import get_channel_layer
from django.conf import settings

from chatproject.server import SCOPE_EXTENSION

from . import generation as gen
from . import ratelimit, tabs, validation, wire
from .dispatching import dispatch_one_pass
from .generation import autostop, frames
from .generation.fanout import Batch
from .generation.sequencer import Action, FrameSequencer
from .layers import release_channel
from .models import Conversation
from .wire import BadFrame

logger = logging.getLogger(__name__)

CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
# RFC 6455 section 7.4.1: "an endpoint ... received a message that violates its policy".
CLOSE_POLICY_VIOLATION = 1008
# RFC 6455 section 7.4.1 / IANA: "Service Restart"; the tab reconnects at once.
CLOSE_SERVICE_RESTART = 1012
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


class ChatConsumer(AsyncJsonWebsocketConsumer):
    """One browser tab on one conversation.

    Group frames go through the socket's FrameSequencer (held until this socket's
    ``state`` frame is sent, deltas already in it dropped, a seq gap repaired by a
    fresh state), so a tab that joins mid-stream sees every character exactly once.

    Authorization: frames are acted on only once ``connect`` found
    the user may use the conversation (its owner, or any user on an id not created yet,
    whose first message creates it for them). A refused socket (4401/4403) may still
    have frames queued behind its close; they are ignored, as are group frames. A
    socket that joined an id before it existed checks the owner on its first group
    frame, and is closed with 4403 if another user created it meanwhile. The actions
    themselves check the owner again (chat.generation: request_stop, request_snapshot,
    the store's prepare functions).

    Every exception of a frame handler is caught at the frame boundary (``receive``):
    logged once, answered with an ``error`` frame (code ``internal``), and the socket
    stays open; no frame closes it with 1011.
    """

    generation = None
    # Its inbox gets the conversation's frames (chat.generation.fanout).
    watching = False
    authorized = False
    # The conversation did not exist when this socket connected (see above).
    _owner_unverified = False
    _fallback: asyncio.Future | None = None
    # A client's sync is being answered (on_sync).
    _syncing = False
    # This socket's tab id (chat.tabs), and whether it saw a run of the conversation.
    tab = None
    saw_run = False
    # chat.ratelimit.SocketLimits, once connect found the user.
    limits = None
    # The server's flow control of this connection (chatproject.server), or None under
    # another server.
    flow = None

    async def __call__(self, scope, receive, send):
        """AsyncConsumer.__call__ (channels 4.3) with a third source beside the client
        and the socket's layer channel: its fan-out inbox, whose frames come in batches
        and skip the framework's per-message thread hop (``aclose_old_connections``);
        each message is handled one loop pass after it arrives (chat.dispatching)."""
        self.scope = scope
        self.inbox = gen.Inbox()
        self.flow = (scope.get("extensions") or {}).get(SCOPE_EXTENSION)
        self.tab = tabs.tab_of(scope)
        # The server may tear the application down (a crash of the connection) without
        # a clean websocket.disconnect: the run this tab started still stops.
        try:
            self.channel_layer = get_channel_layer(self.channel_layer_alias)
            # Other processes answer snapshot requests on it (generation_snapshot).
            self.channel_name = await self.channel_layer.new_channel()
            self.channel_receive = functools.partial(self.channel_layer.receive, self.channel_name)
            self.base_send = send
            try:
                await dispatch_one_pass(receive, self.channel_receive, self.inbox,
                                        self.dispatch, expect_server_queue=self.flow is not None)
            except StopConsumer:
                pass
        finally:
            await self._stop_own_generation("teardown")
            if self.limits is not None:
                self.limits.close()
            await self._unwatch()
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
        if gen.drain.is_draining():
            # This worker is stopping: the tab reconnects at once, to another one.
            await self.accept()
            return await self.close(code=CLOSE_SERVICE_RESTART)
        try:
            self.limits = ratelimit.open_socket(user.id)
        except ratelimit.SocketRefused as exc:
            await self.accept()
            extra = {} if exc.retry_after_ms is None else {"retry_after_ms": exc.retry_after_ms}
            await self.send_json(frames.error(exc.code, exc.detail, **extra))
            await self.close(code=CLOSE_POLICY_VIOLATION)
            return
        gen.leases.ensure_sweeper(self.channel_layer)
        self.sequencer = FrameSequencer()
        # Accept before the database work: daphne drops a handshake not accepted within
        # --websocket_connect_timeout (5 s), which a busy worker reached in bench.load.
        # Frames are held until the state frame anyway.
        await self.accept()
        # Watch before reading the state so no frame published meanwhile is missed.
        self.watching = True
        await gen.watch(self.conversation_id, self.inbox, layer=self.channel_layer)
        try:
            state = await _load_state(user, self.conversation_id)
        except gen.Forbidden:
            await self._unwatch()
            await self.close(code=CLOSE_FORBIDDEN)
            return
        self.authorized = True
        self._owner_unverified = state["conversation"] is None
        await self._catch_up(state)

    async def _resync(self):
        """Send a fresh ``state`` frame: group frames are held from now until it is sent,
        then decided on after it (those it already includes dropped)."""
        self.sequencer.begin_resync()
        if self._fallback is not None and self._fallback is not asyncio.current_task():
            self._fallback.cancel()
        await self._catch_up(await _load_state(self.user, self.conversation_id))

    async def _catch_up(self, state: dict):
        """Send ``state`` with the running generation's snapshot: at once when the run
        is here or there is none, else when its process answers (generation_snapshot)
        or, failing that, from the last checkpoint (_snapshot_fallback)."""
        self._state = state
        self.saw_run = state["streaming"] is not None
        if state["streaming"] is None:
            return await self._send_state(None)
        self.sequencer.begin_resync(forget_positions=True)
        snapshot = await gen.request_snapshot(
            self.conversation_id, self.channel_name, user_id=self.user.id
        )
        if snapshot is not None:
            await self._send_state(snapshot)
        else:
            self._fallback = asyncio.ensure_future(self._snapshot_fallback())

    async def _snapshot_fallback(self):
        await asyncio.sleep(SNAPSHOT_TIMEOUT_S)
        if self.sequencer.state_sent:
            return
        # The owning process did not answer: it died, or the run ended meanwhile. The
        # database has the final text then, or at least the last checkpoint.
        self._state = await _load_state(self.user, self.conversation_id)
        if self.sequencer.state_sent:
            return
        streaming = self._state["streaming"]
        await self._send_state(
            None if streaming is None
            else frames.snapshot(streaming["id"], streaming["content"], None,
                                 streaming["reasoning"])
        )
        if streaming is not None:
            # The run is still streaming somewhere (a busy process) or its process died
            # (the lease will end it): the tab shows the checkpoint, deltas of unknown
            # position are dropped, and a real snapshot is asked for again.
            await self._resync()

    async def generation_snapshot(self, event):
        if self.authorized and not self.sequencer.state_sent:
            await self._send_state(event["generation"])

    async def _send_state(self, generation):
        await self.send_json(self.sequencer.state(self._state, generation))
        while (frame := self.sequencer.next_held()) is not None:
            await self._deliver(frame)

    async def disconnect(self, code):
        if self._fallback is not None:
            self._fallback.cancel()
        # Stop first: the upstream stream is closed without waiting for the layer.
        await self._stop_own_generation("disconnect")
        await self._unwatch()

    async def _unwatch(self):
        """Stop this socket's frames and drop those waiting (idempotent)."""
        if self.watching:
            self.watching = False
            await gen.unwatch(self.conversation_id, self.inbox)

    async def _stop_own_generation(self, reason):
        """A closed tab stops the run it started (chat.tabs), at once when this socket
        started it; a worker that drains closes its sockets and stops nothing."""
        try:
            await tabs.stop_tab_run(self, reason)
        except Exception:  # noqa: BLE001 - the run's lease or the user's stop ends it
            logger.exception("could not stop the run of tab %s", self.tab)

    async def _refuse(self, frame: dict | None = None) -> None:
        """Someone else owns the conversation (created after this socket connected to
        its id): send ``frame`` (a ``forbidden`` error), leave the group, close 4403;
        later frames are ignored."""
        self.authorized = False
        if frame is not None:
            await self.send_json(frame)
        await self._unwatch()
        await self.close(code=CLOSE_FORBIDDEN)

    # -- client frames ------------------------------------------------------------
    async def receive(self, text_data=None, bytes_data=None):
        """One client frame: ignored unless authorized; dropped over the socket's or
        user's frame rate (:meth:`_within_limits`); any failure answered with an
        ``error`` frame, never a 1011 close. The raw text is checked (size, binary)
        before it is parsed (decode_json)."""
        if not self.authorized:
            return
        try:
            if text_data is None:
                raise BadFrame("bad_frame", "Frames must be JSON text.")
            frame = await self.decode_json(text_data)
            if await self._within_limits(frame["type"]):
                await self.receive_json(frame)
        except BadFrame as exc:
            if await self._within_limits("bad_frame"):
                await self.send_json(frames.error(exc.code, exc.detail))
        except gen.Forbidden as exc:
            await self._refuse(exc.to_frame())
        except gen.GenerationError as exc:
            await self.send_json(exc.to_frame())
        except validation.TextRejected as exc:
            await self.send_json(frames.error(exc.code, exc.message))
        except Exception:
            logger.exception(
                "frame failed on %s (conversation %s)", self.channel_name, self.conversation_id
            )
            await self.send_json(
                frames.error("internal", "The server failed to handle this frame.")
            )

    async def _within_limits(self, frame_type: str) -> bool:
        """Charge a client frame to the socket's and user's frame rates
        (chat.ratelimit); False when it is to be dropped. Over the limit the client gets
        a ``rate_limited`` error (at most one a second), a socket that keeps going is
        read no more for a while, then closed with 1008."""
        verdict = self.limits.check(frame_type)
        if verdict is None:
            return True
        if verdict.close:
            logger.warning("closing %s of user %s: frame flood", self.channel_name,
                           self.user.id)
            # Its run stops with the disconnect that follows, as when a tab closes.
            self.authorized = False
            await self._unwatch()
            await self.close(code=CLOSE_POLICY_VIOLATION)
            return False
        if verdict.notify:
            await self.send_json(frames.error(
                "rate_limited", "Too many frames; this one was dropped. Try again in "
                f"{verdict.retry_after_ms} ms.", retry_after_ms=verdict.retry_after_ms))
        if verdict.pause_s and self.flow is not None:
            self.flow.pause_reading_for(verdict.pause_s)
        return verdict.handle

    @classmethod
    async def encode_json(cls, content):
        """The frame as JSON text (chat.wire.encode: orjson)."""
        return wire.encode(content)

    @classmethod
    async def decode_json(cls, text_data):
        """The checked frame object of ``text_data`` (chat.wire.decode); raises BadFrame."""
        return wire.decode(text_data)

    async def receive_json(self, frame):
        """Dispatch one valid frame by its type. Raises GenerationError and
        validation.TextRejected for the client's mistakes."""
        handler = {
            "message": self.on_message,
            "stop": self.on_stop,
            "regenerate": self.on_regenerate,
            "edit": self.on_edit,
            "sync": self.on_sync,
        }.get(frame["type"])
        if handler is None:
            raise BadFrame("unknown_type", f"Unknown frame type {frame['type']!r}.")
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
            layer=self.channel_layer, tab=self.tab,
        )
        # The store checked the owner (it created the conversation for this user, or
        # found it theirs): the group frames that follow need no check.
        self._owner_unverified = False

    async def on_stop(self, frame):
        await gen.request_stop(
            self.conversation_id, user_id=self.user.id, reason="stop", layer=self.channel_layer
        )

    async def on_sync(self, frame):
        """Resend the ``state`` frame (a client that detected a gap in seq asks this).
        At most one is pending per socket: a ``sync`` while a state is being prepared,
        or while the client has not read what was sent (its transport's buffer is
        full), is a no-op: that state, or what is waiting, reaches it first."""
        if self._syncing or (self.flow is not None and self.flow.write_blocked):
            return
        self._syncing = True
        try:
            await self._resync()
        finally:
            self._syncing = False

    # -- group frames -------------------------------------------------------------
    async def dispatch(self, message):
        """AsyncConsumer.dispatch (channels 4.3) without its ``aclose_old_connections()``
        before every handler: a hop to Channels' one thread-sensitive thread to tidy
        that thread's database connection, which no handler here uses. Every database
        call of this consumer and of chat.generation runs in the executor's threads
        (``thread_sensitive=False``), where ``database_sync_to_async`` closes old
        connections around each call itself. Under load that hop was a queue in front
        of every client frame: a stop and a message waited a loop pass or two for it."""
        if isinstance(message, Batch):
            return await self._on_batch(message)
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    async def _on_batch(self, batch: Batch):
        """Frames of the conversation, in order, from the fan-out inbox."""
        if not self.authorized:
            return
        if batch.overflowed:
            # This socket fell CHAT_TUNING.inbox_limit frames behind; they were dropped.
            logger.warning("inbox overflow on %s: resynchronising", self.channel_name)
            await self._resync()
        for frame in batch.frames:
            if not self.authorized:
                return
            if not self.sequencer.hold(frame):
                await self._deliver(frame)

    async def _deliver(self, frame):
        """Send ``frame`` as the sequencer decides, after checking the owner of a
        conversation created since this socket connected."""
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
        action = self.sequencer.decide(frame)
        # A run of the conversation is streaming (chat.tabs.stop_tab_run).
        self.saw_run = frame["type"] == "generation.start" or (
            self.saw_run and frame["type"] != "generation.end")
        if action is Action.RESYNC:
            # A group message was lost between the generation and this socket: repair
            # from the source instead of showing text with a hole.
            logger.warning(
                "seq gap on %s (%s after %s): resynchronising %s", frame["message_id"],
                frame["seq"], self.sequencer.last_seq(frame["message_id"]), self.channel_name,
            )
            return await self._resync()
        if action in (Action.SEND, Action.SEND_THEN_RESYNC):
            await self.send_json(frame)
        if action is Action.SEND_THEN_RESYNC:
            # Finished by a lease sweep, not by the process that streamed it: the saved
            # text is the last checkpoint, which this socket may not match exactly.
            await self._resync()
