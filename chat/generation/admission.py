"""Admission control (issue 11, "past capacity, degrade, never collapse"): a worker that
cannot keep up refuses NEW generations with ``overloaded`` (HTTP 503) so that the runs
it already streams keep their lag bounded, and admits a burst it can carry.

Signals, checked by :func:`admit` before anything is saved (docs/scale.md, "Admission
control", has the measurements behind each choice):

- **streams**: generations registered on this event loop (starting, streaming or
  ending) against ``CHAT_MAX_STREAMS_PER_WORKER`` (0 = no limit, the default). The
  operator's capacity plan: deterministic, cheap, but it cannot follow the machine.
- **start wait**: how long the oldest start admitted and not yet through its
  transaction (``store.prepare_*``, in the executor's threads) has waited, against
  ``CHAT_MAX_START_WAIT_MS`` (2000; 0 = off). A queue of starts is invisible to the
  loop's signals (the loop idles in ``select()`` while the threads work); its wait,
  unlike its length, says whether it really piles up: 100 starts that each take 5 ms
  are no queue, 20 that wait 3 s are. The default equals the retry hint: a start
  waits in that queue no longer than a refused client would wait to come back.
  ``CHAT_MAX_PENDING_STARTS`` (0 = off, the default) still caps their number.
- **standing event-loop lag**: a timer due every ``PROBE_S`` (100 ms) measures how
  late it fires; the lowest lateness over the last ``WINDOW_S`` (1 s) is the loop's
  standing queue (the idea of CoDel, RFC 8289: a queue that never drains over a
  window is standing; a short burst is not), and its average (exponential, time
  constant ``SMOOTHING_S``, 2 s) is compared with ``CHAT_MAX_LOOP_LAG_MS`` (50; 0 =
  off). Every frame of every run waits in that loop, a few times on its way from the
  provider to the socket, so this lag, and not a stream count, is what the running
  answers suffer; it follows whatever the machine gives the worker. A single stall
  (a garbage collection, a burst of handshakes) raises the lateness of a probe or two,
  not the window's lowest. Once refusing, the worker admits again when the average
  fell under half the limit (hysteresis: no flapping at the edge).
- **event-loop busy share**: the share of wall time the loop spends outside its
  selector's ``select()``, averaged with a time constant of ``BUSY_SMOOTHING_S`` (3 s),
  against ``CHAT_MAX_LOOP_BUSY_PCT`` (0 = off, the default); admits again 10 points
  under it. Off by default: measured, a loop is 97-99 % busy from 60 streams on while
  its lag is still small (the deltas it sends coalesce more as it gets busier), so the
  share says "saturated", not "late", and refused bursts the worker could carry.

The per-loop figures live on :class:`~chat.generation.runtime.Runtime` (``loop_lag_ms``,
``lag_refusing``, the starts); this module only measures and decides.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import random
import time

from django.conf import settings

from .errors import Overloaded
from .runtime import Runtime

logger = logging.getLogger(__name__)

PROBE_S = 0.1
WINDOW_S = 1.0
SMOOTHING_S = 2.0
BUSY_SMOOTHING_S = 3.0
BUSY_HYSTERESIS_PCT = 10


class _TimedSelector:
    """The loop's selector, timing ``select()``: the time the loop was idle (s)."""

    def __init__(self, selector):
        self._selector = selector
        self.idle_s = 0.0

    def select(self, timeout=None):
        started = time.perf_counter()
        try:
            return self._selector.select(timeout)
        finally:
            self.idle_s += time.perf_counter() - started

    def __getattr__(self, name):
        return getattr(self._selector, name)


def _timed_selector(loop) -> _TimedSelector | None:
    """The loop's selector wrapped once (asyncio selector loops: daphne's and the
    tests'); None for a loop without one (the busy signal is then off)."""
    selector = getattr(loop, "_selector", None)
    if selector is None or isinstance(selector, _TimedSelector):
        return selector
    loop._selector = _TimedSelector(selector)
    return loop._selector


async def _probe_lag(runtime: Runtime) -> None:
    """Forever: sleep ``PROBE_S``; add the lowest lateness of the last ``WINDOW_S`` (the
    standing lag) and the busy share to the loop's averages."""
    loop = runtime.loop
    selector = _timed_selector(loop)
    recent: collections.deque[tuple[float, float]] = collections.deque()
    while True:
        before = loop.time()
        idle_before = selector.idle_s if selector is not None else 0.0
        await asyncio.sleep(PROBE_S)
        now = loop.time()
        elapsed = now - before
        late_ms = max(0.0, elapsed - PROBE_S) * 1000.0
        recent.append((now, late_ms))
        while now - recent[0][0] > WINDOW_S:
            recent.popleft()
        standing_ms = min(late for _, late in recent)
        # Weight by the time the sample covers: a 1 s stall counts as 10 probes would.
        weight = 1.0 - math.exp(-elapsed / SMOOTHING_S)
        runtime.loop_lag_ms += (standing_ms - runtime.loop_lag_ms) * weight
        runtime.loop_lag_peak_ms = max(runtime.loop_lag_peak_ms, late_ms)
        if selector is not None and elapsed > 0:
            busy_pct = 100.0 * max(0.0, 1.0 - (selector.idle_s - idle_before) / elapsed)
            weight = 1.0 - math.exp(-elapsed / BUSY_SMOOTHING_S)
            runtime.loop_busy_pct += (busy_pct - runtime.loop_busy_pct) * weight


def ensure_probe() -> asyncio.Task | None:
    """Start this loop's probe unless it runs (cheap; call it freely). None when both
    ``CHAT_MAX_LOOP_LAG_MS`` and ``CHAT_MAX_LOOP_BUSY_PCT`` are 0 (both signals off)."""
    if not settings.CHAT_MAX_LOOP_LAG_MS and not settings.CHAT_MAX_LOOP_BUSY_PCT:
        return None
    runtime = Runtime.current()
    return runtime.ensure_service("loop-lag-probe", lambda: _probe_lag(runtime))


def retry_after_ms() -> int:
    """The retry hint of a refusal (ms): ``CHAT_OVERLOAD_RETRY_MS`` times 1 to 1.5, at
    random, so refused clients do not all come back in the same instant."""
    return int(settings.CHAT_OVERLOAD_RETRY_MS * random.uniform(1.0, 1.5))


def refusal_reason(runtime: Runtime) -> str | None:
    """Why this loop refuses new generations now (``"streams"``, ``"starts"`` (too many
    waiting, or waiting too long), ``"lag"`` or ``"busy"``), or None when it admits
    them. Updates the hysteresis state."""
    limit = settings.CHAT_MAX_STREAMS_PER_WORKER
    if limit and runtime.count() + runtime.starting >= limit:
        return "streams"
    pending = settings.CHAT_MAX_PENDING_STARTS
    if pending and runtime.starting >= pending:
        return "starts"
    max_wait = settings.CHAT_MAX_START_WAIT_MS
    if max_wait and runtime.expected_start_wait_ms() > max_wait:
        return "starts"
    max_lag = settings.CHAT_MAX_LOOP_LAG_MS
    lag = runtime.loop_lag_ms
    was = runtime.lag_refusing
    runtime.lag_refusing = bool(max_lag) and (lag > max_lag or (was and lag > max_lag / 2))
    max_busy = settings.CHAT_MAX_LOOP_BUSY_PCT
    busy = runtime.loop_busy_pct
    was_busy = runtime.busy_refusing
    runtime.busy_refusing = bool(max_busy) and (
        busy > max_busy or (was_busy and busy > max_busy - BUSY_HYSTERESIS_PCT))
    if (runtime.lag_refusing or runtime.busy_refusing) != (was or was_busy):
        logger.warning(
            "%s new generations: event-loop lag %.0f ms (limit %s), busy %.0f %% (limit %s), "
            "%d running", "refusing" if runtime.lag_refusing or runtime.busy_refusing
            else "admitting again", lag, max_lag, busy, max_busy, runtime.count(),
        )
    if runtime.lag_refusing:
        return "lag"
    return "busy" if runtime.busy_refusing else None


def admit() -> None:
    """Raise :class:`~chat.generation.errors.Overloaded` (code ``overloaded``, HTTP 503
    with ``Retry-After``) when this worker refuses new generations now; return quietly
    otherwise. Called by ``service.start_generation`` before anything is saved."""
    ensure_probe()
    runtime = Runtime.current()
    reason = refusal_reason(runtime)
    if reason is None:
        return
    wait = retry_after_ms()
    detail = ("The server is busy with other answers; please try again in "
              f"{math.ceil(wait / 1000)} s.")
    raise Overloaded(detail, retry_after_ms=wait, reason=reason)


def stats() -> dict:
    """This loop's admission figures for ``worker.stats``: ``starting`` and
    ``start_wait_ms`` (the oldest's wait), ``loop_lag_ms`` (standing, smoothed),
    ``loop_lag_peak_ms`` (largest single lateness since start), ``loop_busy_pct``
    (smoothed), ``refusing`` (the reason, or None)."""
    runtime = Runtime.current()
    return {"starting": runtime.starting,
            "start_wait_ms": round(runtime.expected_start_wait_ms(), 1),
            "loop_lag_ms": round(runtime.loop_lag_ms, 1),
            "loop_busy_pct": round(runtime.loop_busy_pct, 1),
            "loop_lag_peak_ms": round(runtime.loop_lag_peak_ms, 1),
            "refusing": refusal_reason(runtime)}
