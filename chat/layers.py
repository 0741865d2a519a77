"""Giving back a channel-layer channel once nothing will receive on it again.

Channels has no ``delete_channel()``. channels-redis's RedisPubSubChannelLayer (the
default with REDIS_URL) subscribes a Redis pub/sub channel in ``new_channel()`` and
``group_add()``, and unsubscribes a channel only when a ``receive()`` on it is
cancelled *while waiting*, a group only on the ``group_discard()`` of its last local
member (channels_redis/pubsub.py, 4.3.0). So a channel stays subscribed in Redis for the
life of the process when its last ``receive()`` returned a message instead (a socket
that disconnects while group frames arrive: most such sockets leaked their channel),
when the task receiving on it was cancelled elsewhere (answering a snapshot request),
or when nothing ever received on it.
"""

from __future__ import annotations

import logging

from channels_redis.pubsub import RedisPubSubChannelLayer

from .channels_redis_adapter import release_pubsub_channel

logger = logging.getLogger(__name__)


async def release_channel(layer, channel: str | None) -> None:
    """Forget ``channel`` (a name from ``layer.new_channel()``) in this process: leave
    every group it is in here, and unsubscribe it and the groups left empty.

    Call it after the last ``receive()`` on the channel has ended; a later ``receive()``
    would subscribe it again. Idempotent; does nothing for layers that hold nothing per
    channel (RedisChannelLayer: one list per process, with expiry). Never raises
    (failures are logged): it runs on the way out of sockets and runs.
    """
    if layer is None or not channel:
        return
    try:
        await _release(layer, channel)
    except Exception:  # noqa: BLE001 - cleanup must not replace the caller's outcome
        logger.exception("could not release channel %s", channel)


async def _release(layer, channel: str) -> None:
    if isinstance(layer, RedisPubSubChannelLayer):
        await release_pubsub_channel(layer, channel)
        return
    groups = getattr(layer, "groups", None)
    channels = getattr(layer, "channels", None)
    if isinstance(groups, dict) and isinstance(channels, dict):
        # InMemoryChannelLayer: drop the queue and memberships now instead of at expiry.
        channels.pop(channel, None)
        for name, members in list(groups.items()):
            members.pop(channel, None)
            if not members:
                groups.pop(name, None)
