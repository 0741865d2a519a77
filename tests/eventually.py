"""Waiting for a condition instead of sleeping a fixed time.

``await eventually(predicate)`` polls ``predicate`` (a function, sync or async) until
it returns something truthy or ``timeout`` seconds pass, and returns its last value:
the test's own assertion then judges it, so a timeout fails on the assertion that
says what was expected. ``eventually_sync`` is the same for sync tests.
"""

from __future__ import annotations

import asyncio
import inspect
import time


async def eventually(predicate, timeout: float = 5.0, interval: float = 0.02):
    """The first truthy value of ``predicate()`` (awaited if it is a coroutine), or its
    last value after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value or time.monotonic() >= deadline:
            return value
        await asyncio.sleep(interval)


def eventually_sync(predicate, timeout: float = 5.0, interval: float = 0.02):
    """``eventually`` for sync code: blocks this thread between polls."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)
