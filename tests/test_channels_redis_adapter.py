"""chat.channels_redis_adapter uses channels-redis internals; these tests fail, naming
the library and its version, as soon as an upgrade changes what it relies on, instead
of the batching layer breaking at run time (or silently falling back).

No Redis needed: the layers are built, not connected (channels-redis connects on first
use).
"""

import asyncio
import inspect
import re
from importlib.metadata import version
from pathlib import Path

import channels_redis
import channels_redis.utils
from channels_redis.pubsub import (
    RedisPubSubChannelLayer,
    RedisPubSubLoopLayer,
    RedisSingleShardConnection,
)

from chat import channels_redis_adapter
from chat.channels_redis_adapter import BatchingPubSubChannelLayer

ROOT = Path(__file__).resolve().parent.parent
INSTALLED = version("channels-redis")
WHO = f"channels-redis {INSTALLED} (chat.channels_redis_adapter was written for " \
      f"{channels_redis_adapter.CHECKED_VERSION})"


def test_the_installed_channels_redis_is_the_version_the_adapter_was_written_for():
    pins = re.findall(r"^channels-redis==(\S+)$",
                      (ROOT / "requirements.txt").read_text(), re.MULTILINE)
    assert pins == [channels_redis_adapter.CHECKED_VERSION], (
        "requirements.txt must pin channels-redis exactly, at the version "
        "chat/channels_redis_adapter.py was checked against")
    assert INSTALLED == channels_redis.__version__ == channels_redis_adapter.CHECKED_VERSION, (
        f"{WHO}: re-check every internal listed in its docstring, then update "
        "CHECKED_VERSION and the pin")


def _parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_the_layer_internals_the_adapter_uses_still_exist_with_their_shapes():
    # The per-loop layer is built by the private _get_layer from _args/_kwargs and
    # registered in _layers; the adapter rebuilds it the same way.
    assert _parameters(RedisPubSubChannelLayer._get_layer) == ["self"], WHO
    assert _parameters(channels_redis.utils._wrap_close) == ["proxy", "loop"], WHO
    assert "channel_layer" in _parameters(RedisPubSubLoopLayer.__init__), WHO
    assert _parameters(RedisPubSubLoopLayer._get_shard) == ["self", "channel_or_group_name"], WHO
    assert _parameters(RedisSingleShardConnection.__init__) == [
        "self", "host", "channel_layer"], WHO
    for method in ("_ensure_redis", "_ensure_receiver"):
        assert _parameters(getattr(RedisSingleShardConnection, method)) == ["self"], \
            f"{WHO}: RedisSingleShardConnection.{method}"
    for method in ("publish", "subscribe", "unsubscribe", "flush"):
        assert inspect.iscoroutinefunction(getattr(RedisSingleShardConnection, method)), \
            f"{WHO}: RedisSingleShardConnection.{method}"

    async def build():
        stock = RedisPubSubChannelLayer(hosts=["redis://127.0.0.1:1/0"], prefix="t")
        assert isinstance(stock._args, tuple) and isinstance(stock._kwargs, dict), WHO
        loop_layer = stock._get_layer()
        assert stock._layers == {asyncio.get_running_loop(): loop_layer}, WHO
        assert isinstance(loop_layer.channels, dict), f"{WHO}: loop layer's channels"
        assert isinstance(loop_layer.groups, dict), f"{WHO}: loop layer's groups"
        shards = loop_layer._shards
        assert isinstance(shards, list) and shards, f"{WHO}: loop layer's _shards"
        shard = shards[0]
        assert loop_layer._get_shard("specific.x") is shard, WHO
        assert isinstance(shard._lock, asyncio.Lock), f"{WHO}: shard's _lock"
        assert shard._subscribed_to == set(), f"{WHO}: shard's _subscribed_to"
        assert shard._redis is None and shard._pubsub is None, \
            f"{WHO}: shard's _redis/_pubsub before use"

        batching = BatchingPubSubChannelLayer(hosts=["redis://127.0.0.1:1/0"], prefix="t")
        ours = batching._get_layer()
        assert isinstance(ours, RedisPubSubLoopLayer)
        assert all(isinstance(s, RedisSingleShardConnection) for s in ours._shards)
        assert type(ours._shards[0]).__module__ == "chat.channels_redis_adapter"
        await ours.flush()
        await loop_layer.flush()

    asyncio.run(build())
