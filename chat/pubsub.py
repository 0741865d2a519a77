"""The Redis pub/sub channel layer with batched publishing (issue 11: why PostgreSQL +
Redis collapsed at K = 400; docs/scale.md, "Why PostgreSQL + Redis collapsed").

channels-redis 4.3's ``RedisSingleShardConnection.publish`` holds one ``asyncio.Lock``
per process and Redis host across a whole ``PUBLISH`` round trip, and the same lock
guards ``SUBSCRIBE`` / ``UNSUBSCRIBE``. Every frame of every run of the process, and
every new socket's subscriptions, therefore wait in one FIFO, one round trip each; each
round trip needs at least one pass of the event loop to read its reply. When the loop is
busy (hundreds of upstream streams to read), a pass takes tens of ms, so the process
publishes a few dozen frames per second, whatever Redis could do: measured, 150-210 of
3800-7600 tokens/s delivered at K = 200-400, with the worker's CPU spent reading
upstream chunks that then wait in that queue.

:class:`BatchingPubSubChannelLayer` keeps channels-redis's layer as is (subscriptions,
receiving, groups, flush) and replaces only ``publish``: callers append to the shard's
batch, and one flusher task sends everything queued since its last round trip in ONE
pipeline (``PUBLISH`` x n, no transaction) on a pooled connection of its own, outside
the subscription lock. Each caller still waits until its message was sent (errors are
raised to it) and messages of one shard go out in call order, so a run's frames keep
their order. Cost per message: one list append and one future, instead of a lock
hand-off and a round trip.

``SUBSCRIBE`` / ``UNSUBSCRIBE`` are batched the same way (every new socket subscribes
its channel and its conversation's group, every run its control channel): channels-redis
takes the lock per call, and each hand-off of an ``asyncio.Lock`` costs a pass of the
event loop, so on a busy loop a ramp of 300 sockets subscribed one per pass, ~30 per
second. Changes made while one batch is written go out in the next, in call order,
consecutive ones of a kind in one command.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from channels_redis.pubsub import (
    RedisPubSubChannelLayer,
    RedisPubSubLoopLayer,
    RedisSingleShardConnection,
)
from channels_redis.utils import _wrap_close, decode_hosts

logger = logging.getLogger(__name__)

# Messages per pipeline at most: bounds one round trip's size (a burst after a stall).
MAX_BATCH = 1000


async def _run_batches(take, send) -> None:
    """While ``take()`` returns a non-empty batch, ``await send(batch)`` and wake its
    callers: done, or with what ``send`` raised (a cancellation is raised on too)."""
    while batch := take():
        try:
            await send(batch)
        except BaseException as exc:  # noqa: BLE001 - handed to every waiting caller
            _settle(batch, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
        else:
            _settle(batch, None)


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
        self._batch: list[tuple[str, bytes, asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None
        self._changes: list[tuple[str, str, asyncio.Future]] = []
        self._changer: asyncio.Task | None = None

    async def subscribe(self, channel):
        """SUBSCRIBE ``channel`` (no-op when subscribed); returns once the command was
        written. Raises what redis-py raises (connection errors)."""
        await self._change("subscribe", channel)

    async def unsubscribe(self, channel):
        """UNSUBSCRIBE ``channel`` (no-op when not subscribed); as :meth:`subscribe`."""
        await self._change("unsubscribe", channel)

    async def _change(self, op: str, channel: str) -> None:
        # channels-redis takes the shard's lock for each (un)subscribe: every new socket
        # and every run subscribes, and a lock hand-off costs a pass of the event loop,
        # tens of ms when it is busy, so a burst of new sockets queued for seconds.
        # Here the changes made while one is written go out together, in order.
        done = asyncio.get_running_loop().create_future()
        self._changes.append((op, channel, done))
        if self._changer is None or self._changer.done():
            self._changer = asyncio.ensure_future(self._apply_changes())
        await done

    def _take_changes(self) -> list:
        batch, self._changes = self._changes, []
        return batch

    async def _apply_changes(self) -> None:
        await _run_batches(self._take_changes, self._send_changes)

    async def _send_changes(self, batch: list[tuple[str, str, asyncio.Future]]) -> None:
        async with self._lock:
            # Consecutive changes of one kind: one command with every channel.
            start = 0
            while start < len(batch):
                op = batch[start][0]
                end = start
                while end < len(batch) and batch[end][0] == op:
                    end += 1
                await self._send_change(op, [c for _, c, _ in batch[start:end]])
                start = end

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
        sent = asyncio.get_running_loop().create_future()
        self._batch.append((channel, message, sent))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush_batches())
        await sent

    def _take_batch(self) -> list:
        batch, self._batch = self._batch[:MAX_BATCH], self._batch[MAX_BATCH:]
        return batch

    async def _flush_batches(self) -> None:
        await _run_batches(self._take_batch, self._send_batch)

    async def _send_batch(self, batch: list[tuple[str, bytes, asyncio.Future]]) -> None:
        self._ensure_redis()
        async with self._redis.pipeline(transaction=False) as pipe:
            for channel, message, _ in batch:
                pipe.publish(channel, message)
            await pipe.execute()

    async def flush(self):
        """Cancel the flusher and the subscription changer (their waiting callers get
        CancelledError), then what channels-redis does: stop receiving, close the
        connections."""
        for task in (self._flusher, self._changer):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._flusher = self._changer = None
        for *_, waiting in self._batch + self._changes:
            waiting.cancel()
        self._batch, self._changes = [], []
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
