"""Settings of the bench workers: the app's settings, plus the channel layer picked by
``BENCH_LAYER`` (``core``: channels-redis ``RedisChannelLayer``, the default; ``pubsub``:
``RedisPubSubChannelLayer``), so both can be measured with the same code."""

from chatproject.settings import *  # noqa: F403
from chatproject.settings import CHANNEL_LAYERS, REDIS_URL, env_str

if env_str("BENCH_LAYER", "core") == "pubsub":
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {
                "hosts": [{"address": REDIS_URL, "socket_timeout": 30}],
                "prefix": CHANNEL_LAYERS["default"]["CONFIG"]["prefix"],
            },
        }
    }
