"""Admission control ("past capacity, degrade, never collapse"): a worker that
cannot keep up refuses NEW generations with ``overloaded`` (HTTP 503) so that the runs
it already streams keep their lag bounded, and admits a burst it can carry.

Signals, checked by :func:`admit` before anything is saved (docs/scale.md, "Admission
control", has the measurements behind each choice; the limits but the first are tuning
constants, ``settings.CHAT_TUNING``, chat.tuning):

- **streams**: generations registered on this event loop whose end is not out yet
  (``Runtime.streams``) against ``CHAT_MAX_STREAMS_PER_WORKER`` (0 = no limit, the default). The
  operator's capacity plan: deterministic, cheap, but it cannot follow the machine.
- **start wait**: how long a start admitted now would wait for its transaction (the
  start queue, chat.generation.startqueue, commits the starts waiting together a batch
  at a time): the longer of the oldest waiting start's wait so far and the starts
  waiting times the time each adds to a batch (``Runtime.expected_start_wait_ms``),
  against ``max_start_wait_ms`` (3000; 0 = off), the time to first token a start may
  be kept waiting. A queue of starts is invisible to the loop's signals (the loop
  idles in ``select()`` while a thread commits); its drain time, unlike its length,
  says whether it really piles up: 300 starts that take 3 ms each are a burst to
  absorb, not an overload, and wait instead of being refused; 20 that wait 4 s are.
  ``max_pending_starts`` (0 = off, the default) still caps their number.
- **standing event-loop lag**: a timer due every ``PROBE_S`` (100 ms) measures how
  late it fires; the lowest lateness over the last ``WINDOW_S`` (1 s) is the loop's
  standing queue (the idea of CoDel, RFC 8289: a queue that never drains over a
  window is standing; a short burst is not), and its average (exponential, time
  constant ``SMOOTHING_S``, 2 s) is compared with ``max_loop_lag_ms`` (50; 0 =
  off). Every frame of every run waits in that loop, a few times on its way from the
  provider to the socket, so this lag, and not a stream count, is what the running
  answers suffer; it follows whatever the machine gives the worker. A single stall
  (a garbage collection, a burst of handshakes) raises the lateness of a probe or two,
  not the window's lowest. Once refusing, the worker admits again when the average
  fell under half the limit (hysteresis: no flapping at the edge).

The share of time the loop is busy is not a signal: a loop is nearly always busy from
a few dozen streams on while its lag is still small (the deltas it sends coalesce more
as it gets busier), so that share says "saturated", not "late", and refused bursts the
worker could carry.

The per-loop figures live on :class:`~chat.generation.runtime.Runtime` (``loop_lag_ms``,
``lag_refusing``, the starts); this module only measures and decides.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import random

from django.conf import settings

from .. import metrics
from .errors import Overloaded
from .runtime import Runtime

logger = logging.getLogger(__name__)

PROBE_S = 0.1
WINDOW_S = 1.0
SMOOTHING_S = 2.0
# The retry hint of a start refused by a draining worker (ms, times 1 to 1.5).
SHUTDOWN_RETRY_MS = 500


async def _probe_lag(runtime: Runtime) -> None:
    """Forever: sleep ``PROBE_S``; add the lowest lateness of the last ``WINDOW_S`` (the
    standing lag) to the loop's average."""
    loop = runtime.loop
    recent: collections.deque[tuple[float, float]] = collections.deque()
    while True:
        before = loop.time()
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
        metrics.loop_lag(runtime.loop_lag_ms)
        runtime.loop_lag_peak_ms = max(runtime.loop_lag_peak_ms, late_ms)


def ensure_probe() -> asyncio.Task | None:
    """Start this loop's probe unless it runs (cheap; call it freely). None when
    ``max_loop_lag_ms`` is 0 (the lag signal off)."""
    if not settings.CHAT_TUNING.max_loop_lag_ms:
        return None
    runtime = Runtime.current()
    return runtime.ensure_service("loop-lag-probe", lambda: _probe_lag(runtime))


def retry_after_ms() -> int:
    """The retry hint of a refusal (ms): ``overload_retry_ms`` times 1 to 1.5, at
    random, so refused clients do not all come back in the same instant."""
    return int(settings.CHAT_TUNING.overload_retry_ms * random.uniform(1.0, 1.5))


def refusal_reason(runtime: Runtime) -> str | None:
    """Why this loop refuses new generations now (``"streams"``, ``"starts"`` (too many
    waiting, or waiting too long), or ``"lag"``), or None when it admits
    them. Updates the hysteresis state. ``"shutting_down"`` while the worker drains
    (chat.generation.drain): its clients start again on another worker."""
    if runtime.draining:
        return "shutting_down"
    limit = settings.CHAT_MAX_STREAMS_PER_WORKER
    if limit and runtime.streams() + runtime.starting >= limit:
        return "streams"
    pending = settings.CHAT_TUNING.max_pending_starts
    if pending and runtime.starting >= pending:
        return "starts"
    max_wait = settings.CHAT_TUNING.max_start_wait_ms
    if max_wait and runtime.expected_start_wait_ms() > max_wait:
        return "starts"
    max_lag = settings.CHAT_TUNING.max_loop_lag_ms
    lag = runtime.loop_lag_ms
    was = runtime.lag_refusing
    runtime.lag_refusing = bool(max_lag) and (lag > max_lag or (was and lag > max_lag / 2))
    if runtime.lag_refusing != was:
        logger.warning(
            "%s new generations: event-loop lag %.0f ms (limit %s), %d running",
            "refusing" if runtime.lag_refusing else "admitting again", lag, max_lag,
            runtime.count(),
        )
    return "lag" if runtime.lag_refusing else None


def admit() -> None:
    """Raise :class:`~chat.generation.errors.Overloaded` (code ``overloaded``, HTTP 503
    with ``Retry-After``) when this worker refuses new generations now; return quietly
    otherwise. Called by ``service.start_generation`` before anything is saved."""
    ensure_probe()
    runtime = Runtime.current()
    reason = refusal_reason(runtime)
    if reason is None:
        return
    metrics.admission_refused(reason)
    if reason == "shutting_down":
        # Short: the load balancer sends the retry to a worker that is not stopping.
        wait = int(SHUTDOWN_RETRY_MS * random.uniform(1.0, 1.5))
        detail = "The server is restarting; please try again in a moment."
        raise Overloaded(detail, retry_after_ms=wait, reason=reason)
    wait = retry_after_ms()
    detail = ("The server is busy with other answers; please try again in "
              f"{math.ceil(wait / 1000)} s.")
    raise Overloaded(detail, retry_after_ms=wait, reason=reason)


def stats() -> dict:
    """This loop's admission figures for ``worker.stats``: ``starting`` and
    ``start_wait_ms`` (the oldest's wait), ``loop_lag_ms`` (standing, smoothed),
    ``loop_lag_peak_ms`` (largest single lateness since start), ``refusing`` (the
    reason, or None)."""
    runtime = Runtime.current()
    return {"starting": runtime.starting,
            "start_wait_ms": round(runtime.expected_start_wait_ms(), 1),
            "loop_lag_ms": round(runtime.loop_lag_ms, 1),
            "loop_lag_peak_ms": round(runtime.loop_lag_peak_ms, 1),
            "refusing": refusal_reason(runtime)}
