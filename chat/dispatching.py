"""A consumer's dispatch loop that handles each message one event-loop pass after it
arrives (issue 11: stop and first-token latency, CPU per token).

Channels' ``await_many_dispatch`` keeps a task per source (the client's messages, the
layer channel, here also the fan-out inbox) and waits on them with ``asyncio.wait``: a
message wakes its source's task, whose end wakes ``asyncio.wait``, which wakes the
consumer: three passes, and two tasks made, per message. On a loop busy with 300
streams a pass takes tens of ms, so a ``stop`` reached its handler 30-120 ms after it
arrived (docs/performance.md). :func:`dispatch_one_pass` has the server's queue and the
inbox set one ``asyncio.Event`` instead: one pass, no task per message.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from channels.utils import await_many_dispatch

from .generation.fanout import Inbox


def queue_of(receive) -> asyncio.Queue | None:
    """The ``asyncio.Queue`` whose ``get`` is the ASGI ``receive`` callable (daphne's
    and asgiref's test communicator's are), else None."""
    queue = getattr(receive, "__self__", None)
    if isinstance(queue, asyncio.Queue) and getattr(receive, "__func__", None) is asyncio.Queue.get:
        return queue
    return None


async def dispatch_one_pass(receive, channel_receive: Callable[[], Awaitable[dict]],
                            inbox: Inbox, dispatch: Callable[[object], Awaitable[None]]) -> None:
    """Call ``dispatch`` with every ASGI message of ``receive``, every message of the
    layer channel (``channel_receive``) and every :class:`Inbox` batch, in arrival order
    per source, the client's first, until ``dispatch`` raises (StopConsumer ends a
    consumer). The server's queue and the inbox wake it through ``inbox.ready``; the
    layer channel (snapshot replies from other processes: rare) keeps a task whose end
    does the same. Under a server whose ``receive`` is not an ``asyncio.Queue``'s
    ``get``, Channels' ``await_many_dispatch`` does the work as before."""
    client = queue_of(receive)
    if client is None:
        return await await_many_dispatch([receive, channel_receive, inbox.get], dispatch)
    bell = inbox.ready
    put_nowait = client.put_nowait

    def put_and_ring(message) -> None:
        put_nowait(message)
        bell.set()

    # The server calls put_nowait (asyncio.Queue.put does too): an instance attribute,
    # so only this connection's queue rings this consumer's bell.
    client.put_nowait = put_and_ring
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
        if channel is not None:
            channel.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await channel
