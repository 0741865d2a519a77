"""Generations: stream a chat completion, publish its frames, and really stop it.

Knows nothing of WebSockets or HTTP. Callers (the WebSocket consumer, the API views)
use the names re-exported here; docs/architecture.md draws the path of a frame.
Modules, each depending only on those listed before it::

    frames    every server frame, group names, the relay envelope (no chat imports)
    errors    GenerationError and subclasses with frame code and HTTP status
    prompt    build_prompt and the prompt used for estimates
    budgets   per-user quotas and concurrency, checked inside the start transaction
    autostop  automatic stops of a run (repetition guard, cost ceiling) and their policy
    outcome   Outcome: how a run ended (status, finish_reason, error, usage, timings)
    store     the transactions: prepare_*, finalize, finish_stale, checkpoints
    state     load_state: what a newly connected socket loads
    providers the provider interface and registry, and each provider's module (the
              only modules that import a provider SDK or an HTTP client)
    fanout    Fanout, Inbox: frames to this process's sockets, the relay to the others
    runtime   Runtime: the per-event-loop registry (runs, providers, demo server, services)
    admission refuse new runs past this worker's capacity (overloaded, HTTP 503)
    drain     a worker told to stop: nothing new starts, runs end, the rest interrupted
    task      Generation: the running task, cancellation, coalescing, publishing
    leases    the checkpointer, the sweeper of dead processes' runs, worker stats
    sequencer FrameSequencer: what one socket may send (no I/O)
    service   start_generation, request_stop, request_snapshot, start_detached

Stopping: ``Generation.cancel`` (same event loop) or :func:`request_stop` (any
process, through the conversation's control group) cancels the task. The upstream
response is closed whatever await the task was at when cancelled; the provider sees
the connection close and stops generating. Every run, whatever its end, finishes with
exactly one ``generation.end`` frame and one ``UsageRecord``.
"""

from . import admission, autostop, budgets, drain, frames, leases, store
from .errors import (
    Busy,
    ConcurrencyLimit,
    Forbidden,
    GenerationError,
    InvalidRequest,
    Overloaded,
    QuotaExceeded,
    UpstreamFailure,
    UpstreamTimeout,
)
from .fanout import Inbox
from .frames import control_group_name, group_name
from .outcome import Outcome
from .prompt import build_prompt, build_prompt_safe, prompt_for_estimate
from .providers import StreamEvent, clean_provider_text, uses_demo_model
from .runtime import Runtime
from .service import (
    broadcast,
    request_snapshot,
    request_stop,
    running_generation,
    send_to_group,
    start_detached,
    start_generation,
    unwatch,
    watch,
)
from .state import load_state
from .store import (
    WORKER_ID,
    PreparedRun,
    RunRef,
    finalize,
    finish_stale,
    prepare_edit,
    prepare_message,
    prepare_regenerate,
    prepare_run,
    validate_model,
)
from .task import Generation

__all__ = [
    "Busy", "ConcurrencyLimit", "Forbidden", "Generation", "GenerationError", "Inbox",
    "InvalidRequest", "Outcome", "Overloaded", "PreparedRun", "QuotaExceeded", "RunRef",
    "Runtime", "StreamEvent", "UpstreamFailure", "UpstreamTimeout", "WORKER_ID", "admission",
    "drain",
    "autostop", "broadcast", "budgets",
    "build_prompt", "build_prompt_safe", "clean_provider_text", "control_group_name",
    "finalize", "finish_stale", "frames", "group_name", "leases", "load_state", "prepare_edit",
    "prepare_message", "prepare_regenerate", "prepare_run", "prompt_for_estimate",
    "request_snapshot", "request_stop", "running_generation", "send_to_group", "start_detached",
    "start_generation", "store", "unwatch", "uses_demo_model", "validate_model", "watch",
]
