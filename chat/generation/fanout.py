"""Local fan-out: a conversation's frames reach the sockets of this process directly,
and the channel layer carries them only to other processes.

Sending every frame with ``group_send`` costs one channel-layer message per socket and
the socket's dispatch: on the in-memory layer each send scans every channel for expired
messages, and Channels' ``dispatch`` hops to a thread (``aclose_old_connections``) for
every message, a large share of a busy worker. Instead:

* :class:`Fanout` (one per event loop, ``Runtime.fanout``) keeps the :class:`Inbox`
  of every socket watching each conversation and puts each frame in them without
  awaiting anything; a socket takes what its inbox holds in one batch
  (ChatConsumer.dispatch), in order.
* With a layer that reaches other processes (Redis), one *relay* channel per
  Fanout joins a conversation's group while at least one local socket watches it
  (counted by membership), frames are sent to the group once, in an envelope that
  names their origin, and the relay hands frames of other origins to its local
  inboxes. The in-memory layer (one process by definition) is not used for frames.
* Back-pressure stays bounded: a socket's inbox holds at most ``CHAT_TUNING.inbox_limit``
  frames; past it the inbox is emptied and the socket resynchronises (a fresh state
  frame has all the text), so a stuck socket costs neither memory nor the others'
  time. The run itself still waits only for the layer (``CHAT_TUNING.outbox_limit``).

Order: one publisher per run (Generation._publisher) delivers locally, then sends to
the group; a relay receives one process's group messages in publish order. A lost
relay message shows as a seq gap, which the socket's FrameSequencer repairs.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import deque
from contextvars import Context
from dataclasses import dataclass, field

from channels.layers import InMemoryChannelLayer
from django.conf import settings

from ..layers import release_channel
from . import frames

logger = logging.getLogger(__name__)


def reaches_other_processes(layer) -> bool:
    """Whether ``layer`` connects processes (Redis layers) rather than being the
    in-memory layer, which by its nature serves one process."""
    return layer is not None and not isinstance(layer, InMemoryChannelLayer)


@dataclass
class Batch:
    """What an :class:`Inbox` gives its socket at once: ``frames`` in order, and
    ``overflowed`` if frames were thrown away before them (the socket must resync)."""

    frames: list[dict]
    overflowed: bool = False


@dataclass(eq=False)  # hashed by identity: the Fanout keeps sets of them
class Inbox:
    """The frames waiting for one socket. :meth:`push` never blocks (the publisher of a
    run calls it for every socket); :meth:`get` waits for the next batch.

    ``limit``: frames held at most (default ``CHAT_TUNING.inbox_limit``); one more empties the
    inbox and marks the next batch ``overflowed``."""

    limit: int = 0
    _frames: deque = field(default_factory=deque)
    # Set by every push; the owner may share one Event between several sources.
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    _overflowed: bool = False

    def __post_init__(self) -> None:
        self.limit = self.limit or settings.CHAT_TUNING.inbox_limit

    def push(self, frame: dict) -> None:
        """Queue ``frame`` (a server frame dict) for the socket."""
        if len(self._frames) >= self.limit:
            # The socket fell this far behind: what it missed comes back in a fresh
            # state frame, not as an ever longer queue.
            self._frames.clear()
            self._overflowed = True
        self._frames.append(frame)
        self.ready.set()

    async def get(self) -> Batch:
        """Every frame queued since the last call (waits until there is one)."""
        await self.ready.wait()
        self.ready.clear()
        return self.take() or Batch([])

    def take(self) -> Batch | None:
        """Every frame queued since the last call, at once; None when there is none."""
        if not self._frames and not self._overflowed:
            return None
        batch = Batch(list(self._frames), self._overflowed)
        self._frames.clear()
        self._overflowed = False
        return batch


class Fanout:
    """The sockets of one event loop, by conversation group, and the relay that brings
    other processes' frames to them. Made by ``Runtime``; no I/O but the layer's."""

    def __init__(self) -> None:
        # Tells this process's group messages from others' (its relay ignores its own).
        self.origin = uuid.uuid4().hex
        self._inboxes: dict[str, set[Inbox]] = {}
        self._joined: set[str] = set()
        # One lock per group being joined or left (with its users' count), and one for
        # starting and stopping the relay: a single lock for every group made new
        # sockets join one after another, a loop pass or more each (the subscribe's
        # own lock hand-off), and under a burst of new sockets the last ones waited
        # seconds for their state frame.
        self._group_locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._relay_lock = asyncio.Lock()
        self._relay_layer = None
        self._relay_channel: str | None = None
        self._relay_task: asyncio.Task | None = None

    # -- sockets ------------------------------------------------------------------------
    async def watch(self, conversation_id, inbox: Inbox, layer) -> None:
        """Give ``inbox`` every frame of the conversation from now on (this process's at
        once, other processes' once the relay's group membership is in place, which
        this awaits). Raises what the layer raises (the inbox is then not watching)."""
        group = frames.group_name(conversation_id)
        self._inboxes.setdefault(group, set()).add(inbox)
        if reaches_other_processes(layer):
            try:
                await self._sync_membership(group, layer)
            except BaseException:
                await self.unwatch(conversation_id, inbox)
                raise

    async def unwatch(self, conversation_id, inbox: Inbox) -> None:
        """Stop giving ``inbox`` frames (idempotent). The relay leaves the group with the
        last local socket, and its channel is released with the last group. Never
        raises (failures are logged): sockets call it on their way out."""
        group = frames.group_name(conversation_id)
        inboxes = self._inboxes.get(group)
        if inboxes is not None:
            inboxes.discard(inbox)
            if not inboxes:
                del self._inboxes[group]
        if group in self._joined:
            try:
                await self._sync_membership(group, self._relay_layer)
            except Exception:  # noqa: BLE001 - cleanup must not replace the caller's outcome
                logger.exception("could not leave %s", group)

    def watchers(self, conversation_id) -> int:
        """Sockets of this loop watching the conversation."""
        return len(self._inboxes.get(frames.group_name(conversation_id), ()))

    # -- frames -------------------------------------------------------------------------
    def deliver(self, group: str, frame: dict) -> None:
        """Put ``frame`` in the inbox of every local socket of ``group``; never awaits."""
        for inbox in self._inboxes.get(group, ()):
            inbox.push(frame)

    async def publish(self, conversation_id, frame: dict, layer) -> None:
        """Send ``frame`` to every socket of the conversation: this process's now, other
        processes' through ``layer`` (not at all with the in-memory layer). Raises what
        the layer raises; the local sockets have their frame by then."""
        group = frames.group_name(conversation_id)
        self.deliver(group, frame)
        if reaches_other_processes(layer):
            await layer.group_send(group, frames.envelope(frame, group=group, origin=self.origin))

    # -- the relay ----------------------------------------------------------------------
    async def _sync_membership(self, group: str, layer) -> None:
        """Make the relay's membership of ``group`` match whether a local socket watches
        it. Serialised per group: a socket leaving while another joins must not leave
        the relay in a group nobody here watches, or out of one somebody does. Groups
        join and leave concurrently."""
        lock, users = self._group_locks.get(group) or (asyncio.Lock(), 0)
        self._group_locks[group] = (lock, users + 1)
        try:
            async with lock:
                wanted = bool(self._inboxes.get(group))
                if wanted and group not in self._joined:
                    # Counted before any await, so a last group leaving meanwhile does
                    # not stop the relay under this one.
                    self._joined.add(group)
                    try:
                        async with self._relay_lock:
                            await self._start_relay(layer)
                        await layer.group_add(group, self._relay_channel)
                    except BaseException:
                        self._joined.discard(group)
                        raise
                elif not wanted and group in self._joined:
                    self._joined.discard(group)
                    await self._relay_layer.group_discard(group, self._relay_channel)
                    if not self._joined:
                        async with self._relay_lock:
                            if not self._joined:
                                await self._stop_relay()
        finally:
            lock, users = self._group_locks[group]
            if users == 1:
                del self._group_locks[group]
            else:
                self._group_locks[group] = (lock, users - 1)

    async def _start_relay(self, layer) -> None:
        if self._relay_task is not None:
            return
        self._relay_layer = layer
        self._relay_channel = await layer.new_channel()
        # A fresh context: the relay outlives the socket whose watch started it.
        self._relay_task = asyncio.get_running_loop().create_task(
            self._relay(layer, self._relay_channel), name="fanout-relay", context=Context()
        )

    async def _stop_relay(self) -> None:
        task, channel, layer = self._relay_task, self._relay_channel, self._relay_layer
        self._relay_task = self._relay_channel = None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        # After its last receive (chat.layers: the pub/sub layer keeps it otherwise).
        await release_channel(layer, channel)

    async def _relay(self, layer, channel: str) -> None:
        while True:
            try:
                message = await layer.receive(channel)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a Redis hiccup: a gap, repaired by resync
                logger.exception("relay receive failed")
                await asyncio.sleep(0.1)
                continue
            if message.get("origin") == self.origin or message.get("type") != "chat.frame":
                continue
            group, frame = message.get("group"), message.get("frame")
            if isinstance(group, str) and isinstance(frame, dict):
                self.deliver(group, frame)
