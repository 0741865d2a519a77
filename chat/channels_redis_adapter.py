"""The one module that uses channels-redis's internals (pinned: channels-redis==4.3.0 in
requirements.txt; tests/test_channels_redis_adapter.py fails, naming the library and
its version, when what is used here changes).

What it uses of channels-redis that is not its public API (the ``CHANNEL_LAYERS``
backend and the channel-layer methods), and why:

- ``RedisPubSubChannelLayer._get_layer`` (overridden), its ``_layers``, ``_args``,
  ``_kwargs`` and ``channels_redis.utils._wrap_close``: the layer builds its
  per-event-loop layer by class name, so using a subclass means building it here, as
  channels-redis does.
- ``RedisPubSubLoopLayer._shards`` (replaced by batching shards) and ``_get_shard``,
  ``channels``, ``groups`` (:func:`release_pubsub_channel`).
- ``RedisSingleShardConnection._lock``, ``_subscribed_to``, ``_ensure_redis``,
  ``_ensure_receiver``, ``_pubsub``, ``_redis``: the subscription state the batched
  (un)subscribes keep as channels-redis's own methods do.

**Batched publishing** (docs/scale.md, "Why PostgreSQL + Redis collapsed").
channels-redis's ``RedisSingleShardConnection.publish`` holds one ``asyncio.Lock`` per
process and Redis host across a whole ``PUBLISH`` round trip, and the same lock guards
``SUBSCRIBE`` / ``UNSUBSCRIBE``. Every frame of every run of the process, and every new
socket's subscriptions, therefore wait in one FIFO, one round trip each; each round trip
needs at least one pass of the event loop to read its reply, so on a busy loop the
process publishes a few dozen frames per second, whatever Redis could do.

:class:`BatchingPubSubChannelLayer` keeps channels-redis's layer as is (subscriptions,
receiving, groups, flush) and replaces only ``publish``: callers append to the shard's
batch, and one flusher task sends everything queued since its last round trip in ONE
pipeline (``PUBLISH`` x n, no transaction) on a pooled connection of its own, outside
the subscription lock. Each caller still waits until its message was sent (errors are
raised to it) and messages of one shard go out in call order, so a run's frames keep
their order. ``SUBSCRIBE`` / ``UNSUBSCRIBE`` are batched the same way: changes made
while one batch is written go out in the next, in call order, consecutive ones of a
kind in one command.

**Giving a channel back** (:func:`release_pubsub_channel`). Channels has no
``delete_channel()``; channels-redis subscribes a channel in ``new_channel()`` and
``group_add()`` and unsubscribes it only when a ``receive()`` on it is cancelled while
waiting, a group only on the ``group_discard()`` of its last local member.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import operator

from channels_redis.pubsub import (
    RedisPubSubChannelLayer,
    RedisPubSubLoopLayer,
    RedisSingleShardConnection,
)
from channels_redis.utils import _wrap_close, decode_hosts

logger = logging.getLogger(__name__)

# The channels-redis release whose internals this module was written against (and
# requirements.txt pins); tests/test_channels_redis_adapter.py checks both.
CHECKED_VERSION = "4.3.0"

# Messages per pipeline at most: bounds one round trip's size (a burst after a stall).
MAX_BATCH = 1000


class _Batches:
    """Calls of one kind (publish, or (un)subscribe) sent in batches: what is submitted
    while one batch is being sent goes out in the next, in call order, at most
    ``limit`` items per batch (0: no limit). Each caller waits until its batch was sent
    and gets what sending it raised."""

    def __init__(self, send, limit: int = 0) -> None:
        self._send = send
        self._limit = limit
        self._items: list[tuple] = []
        self._task: asyncio.Task | None = None

    async def submit(self, *item) -> None:
        """Queue ``item`` (the send function's tuple, without a future) and wait until
        its batch was sent; raises what sending it raised."""
        done = asyncio.get_running_loop().create_future()
        self._items.append((*item, done))
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())
        await done

    def _take(self) -> list[tuple]:
        cut = self._limit or len(self._items)
        batch, self._items = self._items[:cut], self._items[cut:]
        return batch

    async def _run(self) -> None:
        while batch := self._take():
            try:
                await self._send(batch)
            except BaseException as exc:  # noqa: BLE001 - handed to every waiting caller
                _settle(batch, exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
            else:
                _settle(batch, None)

    async def cancel(self) -> None:
        """Stop sending; the callers still waiting get CancelledError."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._task = None
        for *_, waiting in self._items:
            waiting.cancel()
        self._items = []


def _settle(batch: list[tuple], exc: BaseException | None) -> None:
    """Wake the callers waiting on ``batch`` (each item's last element is their future):
    with ``exc`` raised to them, or done."""
    for *_, waiting in batch:
        if not waiting.done():
            if exc is None:
                waiting.set_result(None)
            else:
                waiting.set_exception(exc)


class _BatchingShard(RedisSingleShardConnection):
    """One Redis host of a loop layer; ``publish``, ``subscribe`` and ``unsubscribe``
    batched (module docstring)."""

    def __init__(self, host, channel_layer):
        super().__init__(host, channel_layer)
        self._publishes = _Batches(self._send_publishes, MAX_BATCH)
        # channels-redis takes the shard's lock for each (un)subscribe: every new socket
        # and every run subscribes, and a lock hand-off costs a pass of the event loop,
        # tens of ms when it is busy, so a burst of new sockets queued for seconds.
        self._changes = _Batches(self._send_changes)

    async def subscribe(self, channel):
        """SUBSCRIBE ``channel`` (no-op when subscribed); returns once the command was
        written. Raises what redis-py raises (connection errors)."""
        await self._changes.submit("subscribe", channel)

    async def unsubscribe(self, channel):
        """UNSUBSCRIBE ``channel`` (no-op when not subscribed); as :meth:`subscribe`."""
        await self._changes.submit("unsubscribe", channel)

    async def _send_changes(self, batch: list[tuple[str, str, asyncio.Future]]) -> None:
        async with self._lock:
            # Consecutive changes of one kind: one command with every channel.
            for op, run in itertools.groupby(batch, key=operator.itemgetter(0)):
                await self._send_change(op, [channel for _, channel, _ in run])

    async def _send_change(self, op: str, channels: list[str]) -> None:
        subscribing = op == "subscribe"
        # In order, without repeats: only what changes the subscription set.
        wanted = list(dict.fromkeys(
            c for c in channels if (c in self._subscribed_to) != subscribing))
        if not wanted:
            return
        self._ensure_redis()
        self._ensure_receiver()
        if subscribing:
            await self._pubsub.subscribe(*wanted)
            self._subscribed_to.update(wanted)
        else:
            await self._pubsub.unsubscribe(*wanted)
            self._subscribed_to.difference_update(wanted)

    async def publish(self, channel, message):
        """Send ``message`` to the Redis channel ``channel``; returns once Redis took it.
        Raises what redis-py raises for its batch (connection errors)."""
        await self._publishes.submit(channel, message)

    async def _send_publishes(self, batch: list[tuple[str, bytes, asyncio.Future]]) -> None:
        self._ensure_redis()
        async with self._redis.pipeline(transaction=False) as pipe:
            for channel, message, _ in batch:
                pipe.publish(channel, message)
            await pipe.execute()

    async def flush(self):
        """Stop the batched publishes and subscription changes (their waiting callers
        get CancelledError), then what channels-redis does: stop receiving, close the
        connections."""
        await self._publishes.cancel()
        await self._changes.cancel()
        await super().flush()


class _BatchingLoopLayer(RedisPubSubLoopLayer):
    def __init__(self, hosts=None, *args, **kwargs):
        super().__init__(hosts, *args, **kwargs)
        self._shards = [_BatchingShard(host, self) for host in decode_hosts(hosts)]


class BatchingPubSubChannelLayer(RedisPubSubChannelLayer):
    """channels-redis's ``RedisPubSubChannelLayer`` (same CONFIG), publishing in
    batches: one pipelined round trip per flush instead of one locked round trip per
    message. Selected by ``CHANNEL_LAYER=pubsub`` (the default with ``REDIS_URL``);
    ``CHANNEL_LAYER=pubsub-plain`` keeps the stock layer (to compare)."""

    def _get_layer(self):
        loop = asyncio.get_running_loop()
        layer = self._layers.get(loop)
        if layer is None:
            layer = _BatchingLoopLayer(*self._args, **self._kwargs, channel_layer=self)
            self._layers[loop] = layer
            _wrap_close(self, loop)
        return layer


async def release_pubsub_channel(layer: RedisPubSubChannelLayer, channel: str) -> None:
    """Forget ``channel`` in this process's per-loop layer of ``layer``: leave every
    group it is in here, and UNSUBSCRIBE it and the groups left empty. Raises what
    redis-py raises (connection errors)."""
    loop_layer = layer._get_layer()
    loop_layer.channels.pop(channel, None)
    for group_channel, members in list(loop_layer.groups.items()):
        if channel in members:
            members.discard(channel)
            if not members:
                del loop_layer.groups[group_channel]
                await loop_layer._get_shard(group_channel).unsubscribe(group_channel)
    await loop_layer._get_shard(channel).unsubscribe(channel)
