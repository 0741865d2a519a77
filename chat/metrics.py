"""Prometheus metrics of the chat: every metric object, and the one-line calls the
code makes where things happen (``GET /metrics``: chat.metrics_view; docs/operations.md
has the scrape config, the rules and example queries).

Built on ``prometheus_client``. With several worker processes, set
``PROMETHEUS_MULTIPROC_DIR`` (before the process starts: the library reads it at import)
to a directory shared by the workers of one machine: each process writes its values to
files there and any worker's ``/metrics`` answers for all of them (the library's
multiprocess mode, https://prometheus.github.io/client_python/multiprocess/). Wipe that
directory before the workers start (process ids are reused); a worker that exits
normally removes its live-gauge files itself (``mark_process_dead`` at exit); the files
of a killed one stay until the next wipe (its counters rightly still count).

========================================  =========  ==========================  ============
name                                      type       labels                      unit
========================================  =========  ==========================  ============
chat_generations_started_total            counter    model                       runs
chat_generations_total                    counter    model, status,              runs
                                                     finish_reason
chat_tokens_total                         counter    model, kind, source         tokens
chat_cost_usd_total                       counter    model                       USD
chat_tokens_withdrawn_total               counter    model, kind                 tokens
chat_cost_usd_withdrawn_total             counter    model                       USD
chat_tokens_saved_total                   counter    rule                        tokens
chat_time_to_first_token_seconds          histogram  model                       s
chat_generation_duration_seconds          histogram  model, status               s
chat_stop_to_upstream_close_seconds       histogram  (none)                      s
chat_delta_lag_seconds                    histogram  (none)                      s
chat_active_generations                   gauge      (none; sum of live workers) runs
chat_websocket_connections                gauge      (none; sum of live workers) sockets
chat_event_loop_lag_seconds               gauge      (none; worst live worker)   s
chat_admission_refusals_total             counter    reason                      refusals
chat_provider_errors_total                counter    model, kind                 errors
process_*                                 standard   (pid, multiprocess mode)
========================================  =========  ==========================  ============

Run-end figures (generations, tokens, cost, tokens saved, time to first token,
duration) are counted from the run's UsageRecord once its transaction commits
(:func:`run_recorded`, called by ``metering.settle``, the one place a record is
written), so they agree with the database whatever the end: completed, stopped, failed,
or interrupted by the lease sweep. A later correction of the record by the provider's
own figures (``metering.apply_lookup``) adds what it raised to the counters and what it
lowered to the ``*_withdrawn_total`` counters (a Prometheus counter never goes down):
``sum(chat_tokens_total) - sum(chat_tokens_withdrawn_total)`` per kind equals the
records' sum. Label values are bounded: a model outside ``CHAT_MODELS`` is ``other``,
and so is an unknown status or finish_reason (provider text).

Cost on the hot path: one update per run end, per coalesced frame (delta lag) or per
probe of the event loop (every 100 ms); never per token.
"""

from __future__ import annotations

import atexit
import os
import time

from django.conf import settings
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.process_collector import ProcessCollector

MULTIPROC_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
if MULTIPROC_DIR:
    # The library opens its files as metrics are made; a missing directory would fail
    # the worker's start.
    os.makedirs(MULTIPROC_DIR, exist_ok=True)

# Bounded label values (anything else is "other").
STATUSES = ("completed", "cancelled", "failed", "interrupted")
FINISH_REASONS = ("stop", "length", "cancelled", "repetition", "cost_limit", "error",
                  "content_filter", "tool_calls", "function_call")
TOKEN_KINDS = ("prompt", "completion", "reasoning", "cached")
OTHER = "other"

GENERATIONS_STARTED = Counter(
    "chat_generations_started_total", "Generations started (admitted and saved).",
    ["model"])
GENERATIONS = Counter(
    "chat_generations_total", "Generations ended, by how (one per usage record).",
    ["model", "status", "finish_reason"])
TOKENS = Counter(
    "chat_tokens_total", "Tokens of the usage records (reasoning is part of completion, "
    "cached part of prompt), by the source of the counts.", ["model", "kind", "source"])
COST = Counter("chat_cost_usd_total", "Cost of the usage records (USD).", ["model"])
TOKENS_WITHDRAWN = Counter(
    "chat_tokens_withdrawn_total", "Tokens counted at a run's end that the provider's "
    "own record of the generation later lowered.", ["model", "kind"])
COST_WITHDRAWN = Counter(
    "chat_cost_usd_withdrawn_total", "Cost counted at a run's end that the provider's "
    "own record later lowered (USD).", ["model"])
TOKENS_SAVED = Counter(
    "chat_tokens_saved_total", "Automatic stops: what the run's max_tokens would still "
    "have allowed (tokens).", ["rule"])
TTFT = Histogram(
    "chat_time_to_first_token_seconds", "From the request to the first answer text (s).",
    ["model"], buckets=(0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60))
DURATION = Histogram(
    "chat_generation_duration_seconds", "From the start to the end of a run (s).",
    ["model", "status"], buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600))
STOP_TO_CLOSE = Histogram(
    "chat_stop_to_upstream_close_seconds", "From a stop request (in this worker or, "
    "through the channel layer, another) to the provider's connection being closed (s).",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
DELTA_LAG = Histogram(
    "chat_delta_lag_seconds", "From provider text arriving to its frame being published "
    "(s; per frame).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
ACTIVE_GENERATIONS = Gauge(
    "chat_active_generations", "Generations running now (launched, not ended).",
    multiprocess_mode="livesum")
WEBSOCKET_CONNECTIONS = Gauge(
    "chat_websocket_connections", "WebSocket connections open now.",
    multiprocess_mode="livesum")
EVENT_LOOP_LAG = Gauge(
    "chat_event_loop_lag_seconds", "Standing event-loop lag, smoothed (s; the worst "
    "worker).", multiprocess_mode="livemax")
ADMISSION_REFUSALS = Counter(
    "chat_admission_refusals_total", "New generations refused by admission control.",
    ["reason"])
PROVIDER_ERRORS = Counter(
    "chat_provider_errors_total", "Provider faults that failed a run, by kind (4xx, 5xx, "
    "timeout, dropped, malformed, error_event).", ["model", "kind"])

# Multiprocess mode has no custom collectors: each worker keeps its standard process
# figures in gauges of its own (a pid label), refreshed by the event-loop probe.
PROCESS_REFRESH_S = 5.0
_process_gauges: dict[str, Gauge] = {}
_process_refreshed = [0.0]
if MULTIPROC_DIR:
    for _name, _help in (
        ("process_resident_memory_bytes", "Resident memory size in bytes."),
        ("process_virtual_memory_bytes", "Virtual memory size in bytes."),
        ("process_cpu_seconds_total", "Total user and system CPU time spent in seconds."),
        ("process_start_time_seconds", "Start time of the process since unix epoch in seconds."),
        ("process_open_fds", "Number of open file descriptors."),
        ("process_max_fds", "Maximum number of open file descriptors."),
    ):
        # Not registered: the default registry has these names for this process alone.
        _process_gauges[_name] = Gauge(_name, _help, multiprocess_mode="liveall",
                                       registry=None)
    # A worker that exits normally (daphne on SIGTERM) takes its live gauges with it.
    atexit.register(multiprocess.mark_process_dead, os.getpid())


def registry():
    """The registry ``/metrics`` exposes: all workers' files in multiprocess mode
    (``PROMETHEUS_MULTIPROC_DIR``), else this process's default registry."""
    if not MULTIPROC_DIR:
        return REGISTRY
    collected = CollectorRegistry()
    multiprocess.MultiProcessCollector(collected)
    return collected


def model_label(model: str | None) -> str:
    """``model`` when it is one of ``CHAT_MODELS``, else ``other`` (bounded labels)."""
    return model if model in settings.CHAT_MODELS else OTHER


def _bounded(value: str | None, allowed: tuple[str, ...]) -> str:
    return value if value in allowed else OTHER


# --- one-line calls where things happen -------------------------------------------------
def run_started(model: str) -> None:
    """A generation was admitted and saved (service.start_generation)."""
    GENERATIONS_STARTED.labels(model_label(model)).inc()


def run_recorded(record) -> None:
    """A run's UsageRecord was committed (metering.settle, through ``on_commit``): its
    end, tokens, cost, tokens saved and timings. Stops: usage.automatic_stops' rule."""
    model = model_label(record.model)
    status = _bounded(record.status, STATUSES)
    GENERATIONS.labels(model, status, _bounded(record.finish_reason, FINISH_REASONS)).inc()
    source = record.source
    for kind in TOKEN_KINDS:
        TOKENS.labels(model, kind, source).inc(getattr(record, f"{kind}_tokens") or 0)
    COST.labels(model).inc(float(record.cost_usd or 0))
    if record.finish_reason in ("repetition", "cost_limit") and record.max_tokens is not None:
        TOKENS_SAVED.labels(record.finish_reason).inc(
            max(record.max_tokens - record.completion_tokens, 0))
    if record.ttft_ms is not None:
        TTFT.labels(model).observe(record.ttft_ms / 1000)
    DURATION.labels(model, status).observe((record.duration_ms or 0) / 1000)


def usage_counts(record) -> dict:
    """The counts of a record that the counters follow, before a correction."""
    return {**{kind: getattr(record, f"{kind}_tokens") or 0 for kind in TOKEN_KINDS},
            "cost_usd": float(record.cost_usd or 0)}


def usage_corrected(before: dict, record) -> None:
    """A committed record's counts were replaced (metering.apply_lookup): raises go to
    the counters (source ``reported``, as the record now says), drops to the
    ``*_withdrawn_total`` counters."""
    model = model_label(record.model)
    after = usage_counts(record)
    for kind in TOKEN_KINDS:
        change = after[kind] - before[kind]
        if change > 0:
            TOKENS.labels(model, kind, record.source).inc(change)
        elif change < 0:
            TOKENS_WITHDRAWN.labels(model, kind).inc(-change)
    change = after["cost_usd"] - before["cost_usd"]
    (COST if change > 0 else COST_WITHDRAWN).labels(model).inc(abs(change))


def stop_began(requested_at: float | None = None) -> float:
    """The ``time.monotonic()`` a stop began: now, or ``requested_at`` (``time.time()``
    in the process that asked, s; a stop from another worker) when that is earlier, so
    ``chat_stop_to_upstream_close_seconds`` counts the channel layer's hop too. Across
    hosts it relies on their clocks agreeing (NTP): a clock ahead counts as now, one
    more than 60 s behind as 60 s."""
    now = time.monotonic()
    if isinstance(requested_at, (int, float)) and not isinstance(requested_at, bool):
        return now - min(max(time.time() - requested_at, 0.0), 60.0)
    return now


def stop_reached_upstream(stop_at: float | None) -> None:
    """The provider's connection was closed for a stop that reached the run at
    ``stop_at`` (``time.monotonic()``; None: no stop, nothing observed)."""
    if stop_at is not None:
        STOP_TO_CLOSE.observe(time.monotonic() - stop_at)


def generation_task_done(_task) -> None:
    """Done callback of a run's task (launched in Generation.launch: the gauge's inc)."""
    ACTIVE_GENERATIONS.dec()


def admission_refused(reason: str) -> None:
    """admission.admit refused a new generation for ``reason``."""
    ADMISSION_REFUSALS.labels(reason).inc()


def provider_error(model: str, kind: str | None) -> None:
    """A provider fault of ``kind`` (providers.base.guarded; None: not the provider's)."""
    if kind is not None:
        PROVIDER_ERRORS.labels(model_label(model), kind).inc()


def loop_lag(lag_ms: float) -> None:
    """The loop probe's smoothed standing lag (ms); in multiprocess mode also this
    worker's process figures, every PROCESS_REFRESH_S."""
    EVENT_LOOP_LAG.set(lag_ms / 1000)
    if _process_gauges and time.monotonic() - _process_refreshed[0] >= PROCESS_REFRESH_S:
        refresh_process_figures()


def refresh_process_figures() -> None:
    """Copy this process's standard figures (prometheus_client's ProcessCollector) into
    its multiprocess gauges (no-op outside multiprocess mode)."""
    if not _process_gauges:
        return
    _process_refreshed[0] = time.monotonic()
    for family in ProcessCollector(registry=None).collect():
        gauge = _process_gauges.get(family.name) or _process_gauges.get(family.name + "_total")
        if gauge is not None and family.samples:
            gauge.set(family.samples[0].value)


class CountWebSockets:
    """ASGI middleware: ``chat_websocket_connections`` counts the WebSocket connections
    whose application is running (from the handshake to the end)."""

    def __init__(self, application):
        self.application = application

    async def __call__(self, scope, receive, send):
        WEBSOCKET_CONNECTIONS.inc()
        try:
            return await self.application(scope, receive, send)
        finally:
            WEBSOCKET_CONNECTIONS.dec()


refresh_process_figures()
