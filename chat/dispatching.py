"""A consumer's dispatch loop that handles each message one event-loop pass after it
arrives.

Channels' ``await_many_dispatch`` keeps a task per source (the client's messages, the
layer channel, here also the fan-out inbox) and waits on them with ``asyncio.wait``: a
message wakes its source's task, whose end wakes ``asyncio.wait``, which wakes the
consumer: three passes, and two tasks made, per message. On a loop busy with hundreds
of streams a pass takes tens of ms, and a ``stop`` waited that long for its handler.
:func:`dispatch_one_pass` has the server's queue and the inbox set one
``asyncio.Event`` instead: one pass, no task per message.

The server's queue can ring that event when it is this project's
:class:`chatproject.server.InboundQueue` (``python -m chatproject.server`` and
``manage.py runserver``); under another server (plain ``daphne``, the test
communicator) Channels' loop does the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from channels.utils import await_many_dispatch

from chatproject.server import InboundQueue

from .generation.fanout import Inbox

logger = logging.getLogger(__name__)


def queue_of(receive) -> InboundQueue | None:
    """The :class:`InboundQueue` whose ``get`` is the ASGI ``receive`` callable, else
    None."""
    queue = getattr(receive, "__self__", None)
    return queue if isinstance(queue, InboundQueue) else None


async def dispatch_one_pass(receive, channel_receive: Callable[[], Awaitable[dict]],
                            inbox: Inbox, dispatch: Callable[[object], Awaitable[None]], *,
                            expect_server_queue: bool = False) -> None:
    """Call ``dispatch`` with every ASGI message of ``receive``, every message of the
    layer channel (``channel_receive``) and every :class:`Inbox` batch, in arrival order
    per source, the client's first, until ``dispatch`` raises (StopConsumer ends a
    consumer). The server's queue and the inbox wake it through ``inbox.ready``; the
    layer channel (snapshot replies from other processes: rare) keeps a task whose end
    does the same. ``expect_server_queue``: the connection is ChatServer's (its scope
    has the flow-control extension), so anything but an InboundQueue is logged as an
    error."""
    client = queue_of(receive)
    if client is None:
        if expect_server_queue:
            # Under ChatServer the queue is always an InboundQueue: a class from another
            # copy of chatproject.server would silently cost the one-pass dispatch.
            logger.error("ChatServer's connection queue is a %s, not chatproject.server's "
                         "InboundQueue: dispatching through Channels' loop",
                         type(getattr(receive, "__self__", receive)).__qualname__)
        return await await_many_dispatch([receive, channel_receive, inbox.get], dispatch)
    bell = inbox.ready
    client.listener = bell
    if not client.empty():
        bell.set()
    channel = None
    try:
        while True:
            bell.clear()
            if channel is None:
                channel = asyncio.ensure_future(channel_receive())
                channel.add_done_callback(lambda _: bell.set())
            # After each dispatch every source is looked at again (what came meanwhile
            # is found there), the client's first.
            if not client.empty():
                await dispatch(client.get_nowait())
                continue
            batch = inbox.take()
            if batch is not None:
                await dispatch(batch)
                continue
            if channel.done():
                message, channel = channel.result(), None
                await dispatch(message)
                continue
            await bell.wait()
    finally:
        client.listener = None
        if channel is not None:
            channel.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await channel
