"""Admission control (issue 11, "past capacity, degrade, never collapse"): a worker that
cannot keep up refuses NEW generations with ``overloaded`` (HTTP 503) so that the runs
it already streams keep their lag bounded.

Two signals, checked by :func:`admit` before anything is saved (docs/scale.md,
"Admission control", says why these two):

- **streams**: generations registered on this event loop (starting, streaming or
  ending) against ``CHAT_MAX_STREAMS_PER_WORKER`` (0 = no limit). The operator's
  capacity plan: deterministic, cheap, and it holds before the loop shows any lag.
- **event-loop lag**: a timer that should fire every ``PROBE_S`` (100 ms) measures how
  late it fires; the lateness (ms) is smoothed (exponential moving average with a time
  constant of ``SMOOTHING_S``, 2 s) and compared with ``CHAT_MAX_LOOP_LAG_MS`` (0 =
  off). Every frame of every run waits in that same loop, so its lateness is the delay
  every running answer suffers on top of the provider's; it needs no capacity figure
  and follows whatever the machine gives the worker (other processes, a slow host).
  With a 2 s time constant one stall of 1 s (a garbage collection, a slow query on the
  loop) raises the average by about 420 ms, a lag that lasts raises it to its size.
  Once refusing for lag, the worker admits again only when the average fell under half
  the limit (hysteresis: no flapping at the edge).

The per-loop figures live on :class:`~chat.generation.runtime.Runtime` (``loop_lag_ms``,
``lag_refusing``); this module only measures and decides.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random

from django.conf import settings

from .errors import Overloaded
from .runtime import Runtime

logger = logging.getLogger(__name__)

PROBE_S = 0.1
SMOOTHING_S = 2.0


async def _probe_lag(runtime: Runtime) -> None:
    """Forever: sleep ``PROBE_S``, add how late the wake-up came to the loop's average."""
    loop = runtime.loop
    while True:
        before = loop.time()
        await asyncio.sleep(PROBE_S)
        elapsed = loop.time() - before
        late_ms = max(0.0, elapsed - PROBE_S) * 1000.0
        # Weight by the time the sample covers: a 1 s stall counts as 10 probes would.
        weight = 1.0 - math.exp(-elapsed / SMOOTHING_S)
        runtime.loop_lag_ms += (late_ms - runtime.loop_lag_ms) * weight
        runtime.loop_lag_peak_ms = max(runtime.loop_lag_peak_ms, late_ms)


def ensure_probe() -> asyncio.Task | None:
    """Start this loop's lag probe unless it runs (cheap; call it freely). None when
    ``CHAT_MAX_LOOP_LAG_MS`` is 0 (the lag signal is off)."""
    if not settings.CHAT_MAX_LOOP_LAG_MS:
        return None
    runtime = Runtime.current()
    return runtime.ensure_service("loop-lag-probe", lambda: _probe_lag(runtime))


def retry_after_ms() -> int:
    """The retry hint of a refusal (ms): ``CHAT_OVERLOAD_RETRY_MS`` times 1 to 1.5, at
    random, so refused clients do not all come back in the same instant."""
    return int(settings.CHAT_OVERLOAD_RETRY_MS * random.uniform(1.0, 1.5))


def refusal_reason(runtime: Runtime) -> str | None:
    """Why this loop refuses new generations now (``"streams"`` or ``"lag"``), or None
    when it admits them. Updates the lag hysteresis state."""
    limit = settings.CHAT_MAX_STREAMS_PER_WORKER
    if limit and runtime.count() >= limit:
        return "streams"
    max_lag = settings.CHAT_MAX_LOOP_LAG_MS
    if not max_lag:
        runtime.lag_refusing = False
        return None
    lag = runtime.loop_lag_ms
    was = runtime.lag_refusing
    runtime.lag_refusing = lag > max_lag or (was and lag > max_lag / 2)
    if runtime.lag_refusing != was:
        logger.warning(
            "%s new generations: event-loop lag %.0f ms (limit %s ms), %d running",
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
    wait = retry_after_ms()
    detail = ("The server is busy with other answers; please try again in "
              f"{math.ceil(wait / 1000)} s.")
    raise Overloaded(detail, retry_after_ms=wait, reason=reason)


def stats() -> dict:
    """This loop's admission figures for ``worker.stats``: ``loop_lag_ms`` (smoothed),
    ``loop_lag_peak_ms`` (largest single lateness since start), ``refusing``."""
    runtime = Runtime.current()
    return {"loop_lag_ms": round(runtime.loop_lag_ms, 1),
            "loop_lag_peak_ms": round(runtime.loop_lag_peak_ms, 1),
            "refusing": refusal_reason(runtime)}
