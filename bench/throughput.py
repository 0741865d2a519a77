"""Throughput bench: CPU per delivered token, lag and stop latency of one worker at K
concurrent streams, next to two floors that only read the same streams.

    python -m bench.throughput                       # all but chainlit, about 12 minutes
    python -m bench.throughput --ks 50,200 --configs defaults,sdk --duration 10
    python -m bench.throughput --ks 200 --configs defaults --profile --json out.json
    python -m bench.throughput --burst --ks 200 --configs defaults,postgres
    python -m bench.throughput --ks 200 --configs defaults,chainlit --duration 10

What it starts (loopback only; everything is stopped at the end):

- the bench upstream (``bench.upstream``: OpenAI-compatible, every token tagged with
  its index and the wall-clock time it was written) in its own process, every stream
  paced at ``--rate`` tokens/s (20);
- per configuration and K, ``--workers`` fresh daphne processes (``DEBUG=0``), and the
  client processes (``--client-procs``, default one per 200 streams) holding one
  websocket per stream, each stream by its own user;
- for a floor, one process that reads the K streams itself and does nothing else:
  ``sdk`` (``AsyncOpenAI.chat.completions.create(stream=True)``, as the app calls it) or
  ``httpx`` (httpx2, the SDK's own HTTP client, and stdlib ``json`` on the SSE lines).

Configurations (``--configs``, comma-separated): ``defaults`` (the embedded defaults:
SQLite in a temporary file, in-memory channel layer), ``postgres`` (PostgreSQL database
``--database``, recreated, and the Redis pub/sub layer on ``--redis`` with channel
prefix ``--channel-prefix``), ``sdk`` and ``httpx`` (the floors), ``sdk-asyncio`` (the
SDK floor with its HTTP client on the app's socket backend, chat.generation.providers.netstream:
that backend's own cost, next to ``sdk``), and ``chainlit`` (not in the default set):
Chainlit's OpenAI streaming example from its docs (``bench/chainlit_app.py``) in one
uvicorn process, driven over socket.io as Chainlit's page does (``bench.chainlit_client``;
its virtualenv is made by ``bash bench/chainlit_env.sh``, found through
``CHAINLIT_PYTHON`` or ``~/.cache/chat-bench/chainlit-venv``; without it the row is
skipped with a message). Its stop is Chainlit's ``stop`` event (the Stop button), which
cancels the handler's task.

Timeline of one row: streams start evenly over the ramp (K/100 s, 1 to 5 s), then
``--settle`` s for the last ones to reach their first token, then the measurement
window of ``--duration`` s, during which every stream is (meant to be) streaming; each
stream asks for enough tokens to last until a second after the window. 10 % of the
streams (``--stop-share``) are stopped at a random point of the window (a ``stop``
frame; for a floor, its reading task is cancelled, which closes the response as the app
does). Streams still running 5 s after the window (4 s after their last token was
due) are closed, so a collapsing configuration does not hold the bench up.

Columns (one row per configuration and K):

- CPU per 1000 tokens: user + system CPU time of the worker(s) (``/proc/<pid>/stat``;
  for a floor, its process) over the window, divided by the tokens received at the
  sockets over the window, times 1000 (s);
- cores used (waiting): that CPU time divided by the window's length; in brackets, the
  time its threads were runnable but waiting for a CPU (``/proc/<pid>/task/*/schedstat``)
  divided by the window's length. A worker that lags while it used well under 1 core
  and waited long was starved by a busy machine, not limited by its code;
- delivered / offered: tokens received at the sockets during the window per second /
  tokens the streams asked for during the window per second (K x rate, less the part of
  the window after a stream's stop);
- lag p50 / p99: upstream write time -> socket receive time of every token received in
  the window (wall clock on both sides, one machine);
- (progress line and ``--json`` only) socket open p50 / p99: the stream's planned start
  -> its socket open with its ``state`` frame received (handshake, session, the
  conversation's subscriptions and state): where a ramp of new sockets queues;
- TTFT p50: message frame sent -> first delta received (floor: request sent -> first
  content chunk);
- stop -> close p50 / p99 (n): stop frame sent -> the upstream saw the connection
  closed (monotonic clock on both sides), over the stopped streams. With ``--stop-via
  other-worker`` (needs ``--workers`` 2 or more) the stop is sent by a second tab of
  the same user and conversation connected to ANOTHER worker than the one running the
  answer (opened once the answer started): a cross-process stop, through the
  channel layer;
- chunks after stop: chunks the upstream wrote after the stop was sent, summed over the
  stopped streams;
- refusals (streams never admitted): ``{"type": "error", "code": "overloaded"}``
  frames the clients received (admission control, chat.generation.admission: a worker
  past its capacity refuses new runs). A client sends its message again after the
  frame's ``retry_after_ms``, as the page tells its user to, asking only for the tokens
  still due; in brackets, the streams refused until their planned end;
- unfinished / errors: streams still running when they were closed, 5 s after the
  window (their lag was longer than 4 s) / streams that failed otherwise (an error
  frame or a closed socket, or no token at all without being stopped or refused).

``--burst``: K tabs already connected (their sockets opened over the first K/50 s, at
least 2) send their message in the same instant, and a refused one does not come back
(no retry); the window (``--duration``, 5 s) starts ``--settle`` (3 s) after the burst.
It prints, per row: refusals (by reason), the tokens delivered in the window as a share
of those offered (every stream, refused ones included), TTFT p50 / p99 of the admitted
streams, lag p50 / p99, CPU per 1000 tokens and cores used (waiting).

``--json FILE`` writes every figure, and more: per-row CPU of the upstream and the
clients, load averages, lost/duplicated tokens, and the CPU per 1000 tokens over the
whole row (from the first stream's start until every stream is over, over every token
received; ``cpu_per_1000_tokens_whole_s``, what the regression guard
``tests/test_throughput_guard.py`` uses). ``--profile`` runs py-spy on the (first) worker
during the window of K=``--profile-k`` of the first app configuration and writes a flame
graph SVG, the raw stacks and a top-functions text to ``artifacts/``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import math
import os
import random
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from bench import chainlit_client
from bench.common import (
    MODEL,
    ROOT,
    Child,
    Client,
    app_env,
    cleanup_redis,
    cpu_snapshot,
    fmt_ms,
    free_port,
    percentile,
    prepare_database,
    recreate_database,
    sleep_until,
    start_daphne,
    start_upstream,
    stop_process,
    upstream_stats,
    wait_port,
    wait_snapshot,
)

ARTIFACTS = ROOT / "artifacts"
APP_CONFIGS = ("defaults", "postgres")
FLOORS = ("sdk", "httpx", "sdk-asyncio")
# Other servers under the same load; not run by default (they need their own virtualenv).
OTHERS = ("chainlit",)
DEFAULT_CONFIGS = (*APP_CONFIGS, *FLOORS)
ALL_CONFIGS = (*DEFAULT_CONFIGS, *OTHERS)
# The tokens a tag asks the bench upstream for (bench.upstream.TOKENS_RE).
TOKENS_RE = re.compile(r"\btokens=(\d+)")

LABELS = {
    "defaults": "app, embedded defaults",
    "postgres": "app, PostgreSQL + Redis",
    "sdk": "floor: openai SDK alone",
    "httpx": "floor: httpx + stdlib json",
    "sdk-asyncio": "floor: openai SDK, sockets on asyncio",
    "chainlit": "Chainlit 2.12 docs example (OpenAI streaming)",
}


# --- the plan of one row ----------------------------------------------------------------
@dataclass(frozen=True)
class Timeline:
    """Seconds after the common start ``t0`` (see the module docstring)."""

    ramp: float
    settle: float
    duration: float
    tail: float = 1.0  # streams last this long past the window
    grace: float = 4.0  # then this long for their ends, before they are closed
    # Burst: the sockets open over the first ``lead`` s, then every message is sent at
    # ``lead`` (the ramp is 0).
    lead: float = 0.0

    @classmethod
    def for_k(cls, k: int, duration: float, settle: float = 2.0,
              grace: float = 4.0, burst: bool = False) -> Timeline:
        """The bench's timeline for K streams: a ramp of K/100 s, at least 1, at most 5;
        with ``burst``, no ramp but a lead of K/50 s (at least 2) to open the sockets."""
        if burst:
            return cls(ramp=0.0, settle=settle, duration=duration, grace=grace,
                       lead=max(2.0, k / 50))
        return cls(ramp=min(5.0, max(1.0, k / 100)), settle=settle, duration=duration,
                   grace=grace)

    @property
    def window(self) -> tuple[float, float]:
        start = self.lead + self.ramp + self.settle
        return start, start + self.duration

    @property
    def deadline(self) -> float:
        return self.window[1] + self.tail + self.grace


@dataclass(frozen=True)
class StreamSpec:
    """One stream: when it starts and maybe stops (s after t0), how many tokens it asks
    for, its tag (the user message, which the upstream reports the request under)."""

    index: int
    tag: str
    tokens: int
    start: float
    stop: float | None
    port: int = 0  # app: the worker's port
    cookie: str = ""  # app: the user's session
    stop_port: int = 0  # app, --stop-via other-worker: the port the stop is sent to
    open_at: float | None = None  # burst: when its socket opens (s after t0)


def make_specs(k: int, run_tag: str, timeline: Timeline, rate: float, *, stop_share: float,
               seed: int, ports: list[int] | None = None,
               cookies: list[str] | None = None,
               stop_via: str = "owner") -> list[StreamSpec]:
    """K streams started evenly over the ramp, each lasting to ``tail`` s after the
    window; ``round(stop_share * k)`` of them (spread over the ramp) stopped at a random
    point between 10 % and 90 % of the window; with ``stop_via="other-worker"``, by a
    tab on the next worker of ``ports`` (the stream's own is ``ports[i % n]``)."""
    rng = random.Random(seed)
    start_w, end_w = timeline.window
    stopped = set()
    n_stop = round(stop_share * k)
    if n_stop:
        step = k / n_stop
        stopped = {int(i * step + step / 2) for i in range(n_stop)}
    specs = []
    for i in range(k):
        start = timeline.lead + timeline.ramp * i / k
        tokens = math.ceil((end_w + timeline.tail - start) * rate)
        stop = start_w + timeline.duration * rng.uniform(0.1, 0.9) if i in stopped else None
        specs.append(StreamSpec(
            index=i, tag=f"{run_tag}-{i} tokens={tokens}", tokens=tokens, start=start,
            stop=stop, port=ports[i % len(ports)] if ports else 0,
            cookie=cookies[i] if cookies else "",
            open_at=timeline.lead * 0.8 * i / k if timeline.lead else None,
            stop_port=(ports[(i + 1) % len(ports)]
                       if stop is not None and stop_via == "other-worker" and ports
                       and len(ports) > 1 else 0),
        ))
    return specs


def offered_tokens(specs: list[StreamSpec], timeline: Timeline, rate: float) -> float:
    """Tokens the streams ask for during the window (nominal: from each stream's start,
    at ``rate``, until its stop or last token)."""
    start_w, end_w = timeline.window
    total = 0.0
    for spec in specs:
        end = spec.stop if spec.stop is not None else spec.start + spec.tokens / rate
        total += max(0.0, min(end, end_w) - max(spec.start, start_w)) * rate
    return total


# --- what every kind of client reports per stream --------------------------------------
def stream_result(spec: StreamSpec, **fields) -> dict:
    """``{index, tag, sent_at, first_at, stop_sent_at, received_at: [s], lags_ms: [ms],
    tokens: [int], refused, admitted, error, end_status, timed_out}`` (times: monotonic
    s; ``refused``: overloaded frames received, ``admitted``: False when the stream
    was refused until its end; ``tag``: the last message sent)."""
    result = {
        "index": spec.index, "tag": spec.tag, "sent_at": None, "first_at": None,
        "stop_sent_at": None, "received_at": [], "lags_ms": [], "tokens": [],
        "refused": 0, "admitted": True, "error": None, "end_status": None,
        "timed_out": False,
    }
    result.update(fields)
    return result


def _child_main(conn, runner, *args) -> None:
    """Entry of a client or floor process (a :class:`bench.common.Child`): ready, wait
    for t0, run, send the results."""
    try:
        prepared = runner(*args)
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        conn.send(f"{type(exc).__name__}: {exc}")
        return
    conn.send("ready")
    t0 = conn.recv()
    conn.send(asyncio.run(prepared(t0)))
    # Stay until the parent lets go (it closes the channel): its last CPU reading of
    # this process comes after the result.
    with contextlib.suppress(Exception):
        conn.recv()


# --- app clients (websockets) ----------------------------------------------------------
async def admitted_tag(client: Client, spec: StreamSpec, t0: float, end_at: float,
                       retry: bool = True) -> str:
    """Wait for the answer to the message just sent; while it is refused
    (``overloaded``), send it again after the frame's ``retry_after_ms``, as the page
    tells its user to, asking only for the tokens still due before ``end_at``
    (monotonic s: the stream's planned last token), under a new tag (the upstream
    reports requests by tag); not with ``retry`` False (a refusal is then final).
    Returns the tag of the last message sent; the socket's events then describe that
    one (refused for good when the end came first)."""
    tag = spec.tag
    first_at = t0 + spec.start
    while True:
        await client.started.wait()
        refusal = client.refusal
        if refusal is None or client.record.message_id is not None or not retry:
            return tag
        retry_at = time.monotonic() + max(0.1, refusal.get("retry_after_ms", 2000) / 1000)
        left = math.ceil(spec.tokens * (end_at - retry_at) / max(1e-3, end_at - first_at))
        if left < 1:
            return tag
        await sleep_until(retry_at)
        client.rearm()
        tag = f"{spec.tag.split(' tokens=')[0]}r{client.record.refused} tokens={left}"
        await client.send({"type": "message", "content": tag})


async def app_stream(spec: StreamSpec, t0: float, deadline: float, end_at: float,
                     retry: bool = True) -> dict:
    """One owner socket: connect, send the tag as a message (again after each
    ``overloaded`` refusal unless ``retry`` is False: :func:`admitted_tag`), maybe
    stop, wait for the end; closed at ``deadline`` (monotonic s) whatever happens.
    ``end_at``: when its last token is due (monotonic s). A burst's socket
    (``spec.open_at``) opens first and sends its message at ``spec.start``."""
    await sleep_until(t0 + (spec.open_at if spec.open_at is not None else spec.start))
    client = Client("owner")
    record = client.record
    timed_out = False
    opened_late_ms = None
    tag = spec.tag
    conversation = str(uuid.uuid4())
    stopper = Client("stopper") if spec.stop_port else None
    opening = None

    async def open_stopper():
        # A second tab on another worker, once the answer runs (its state frame then
        # shows the run); the stop it sends crosses processes through the layer.
        await client.started.wait()
        if client.ended.is_set():  # refused (overloaded) or failed: nothing to stop
            return
        await stopper.open(spec.stop_port, conversation, spec.cookie,
                           timeout=deadline - time.monotonic(), close_timeout=2)

    try:
        async with asyncio.timeout(deadline - time.monotonic()):
            await client.open(spec.port, conversation, spec.cookie,
                              timeout=deadline - time.monotonic(), close_timeout=2)
            if spec.open_at is not None:
                opened_late_ms = (time.monotonic() - t0 - spec.open_at) * 1000
                await sleep_until(t0 + spec.start)
            record.sent_at = time.monotonic()
            if spec.open_at is None:
                opened_late_ms = (record.sent_at - t0 - spec.start) * 1000
            await client.send({"type": "message", "content": spec.tag})
            tag = await admitted_tag(client, spec, t0, end_at, retry)
            opening = asyncio.create_task(open_stopper()) if stopper else None
            if spec.stop is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(client.ended.wait(), t0 + spec.stop - time.monotonic())
                if not client.ended.is_set() and opening is not None:
                    # The second tab opens once the answer started, or at once when it
                    # was refused (then no stop is sent: there is nothing to stop).
                    await opening
                if not client.ended.is_set():
                    record.stop_sent_at = time.monotonic()
                    await (stopper or client).send({"type": "stop"})
            await client.ended.wait()
    except TimeoutError:
        timed_out = True
    except Exception as exc:  # noqa: BLE001 - recorded, the bench goes on
        record.error = f"{type(exc).__name__}: {exc}"
    finally:
        record.left_early = True  # our own close is no error
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await client.close()
        if stopper is not None:
            stopper.record.left_early = True
            if opening is not None and not opening.done():
                opening.cancel()
            with contextlib.suppress(BaseException):
                async with asyncio.timeout(5):
                    await stopper.close()
    return stream_result(
        spec, tag=tag, admitted=record.message_id is not None, sent_at=record.sent_at,
        first_at=record.first_delta_at,
        stop_sent_at=record.stop_sent_at, received_at=record.received_at,
        lags_ms=record.latencies_ms, tokens=record.tokens, refused=record.refused,
        refused_reasons=record.refused_reasons,
        error=record.error, end_status=record.end_status, timed_out=timed_out,
        open_ms=opened_late_ms,
    )


async def warm_up(port: int, cookie: str, tag: str, timeout: float = 60) -> None:
    """One short run on a fresh worker, so that the measured streams do not pay for its
    first-use costs (imports, tokenizer, the SDK client, database connections)."""
    client = Client("owner")
    try:
        async with asyncio.timeout(timeout):
            await client.open(port, str(uuid.uuid4()), cookie, timeout=timeout)
            await client.send({"type": "message", "content": tag})
            await client.ended.wait()
    finally:
        await client.close()
    if client.record.end_status != "completed":
        raise RuntimeError(f"the warm-up run on {port} ended {client.record.end_status}: "
                           f"{client.record.error}")


def app_clients(specs: list[StreamSpec], timeline: Timeline, retry: bool = True):
    """Runner of a client process (see :func:`_child_main`); ``retry``: send a refused
    message again after its ``retry_after_ms``."""
    import websockets  # noqa: F401 - imported before t0, not during the ramp

    async def run(t0: float) -> list[dict]:
        deadline = t0 + timeline.deadline
        end_at = t0 + timeline.window[1] + timeline.tail
        return await asyncio.gather(*(app_stream(s, t0, deadline, end_at, retry)
                                      for s in specs))

    return run


# --- floors ----------------------------------------------------------------------------
def _tokens_of(chunks: list[tuple[float, float, str]]) -> tuple[list, list, list]:
    """(monotonic, wall, text) per chunk -> received_at, lags_ms, token indices."""
    received_at, lags, tokens = [], [], []
    for mono, wall, text in chunks:
        for piece in text.split():
            index, _, stamp = piece.partition("@")
            tokens.append(int(index))
            received_at.append(mono)
            lags.append((wall - float(stamp)) * 1000)
    return received_at, lags, tokens


async def floor_stream(read, spec: StreamSpec, t0: float, deadline: float) -> dict:
    """Run ``read(spec, chunks, state)`` as a task; cancel it at the stop (closing the
    response, as the app's stop does) or at ``deadline``."""
    await sleep_until(t0 + spec.start)
    chunks: list[tuple[float, float, str]] = []
    state = {"sent_at": time.monotonic(), "end_status": None, "error": None}
    task = asyncio.create_task(read(spec, chunks, state))
    stop_sent_at = None
    timed_out = False
    if spec.stop is not None:
        await asyncio.wait({task}, timeout=max(0.0, t0 + spec.stop - time.monotonic()))
        if not task.done():
            stop_sent_at = time.monotonic()
            task.cancel()
            state["end_status"] = "cancelled"
    await asyncio.wait({task}, timeout=max(0.0, deadline - time.monotonic()))
    if not task.done():
        timed_out = True
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        try:
            await task
        except Exception as exc:  # noqa: BLE001 - recorded
            state["error"] = f"{type(exc).__name__}: {exc}"
    received_at, lags, tokens = _tokens_of(chunks)
    return stream_result(
        spec, sent_at=state["sent_at"], first_at=received_at[0] if received_at else None,
        stop_sent_at=stop_sent_at, received_at=received_at, lags_ms=lags, tokens=tokens,
        error=state["error"], end_status=state["end_status"], timed_out=timed_out,
    )


def sdk_floor(specs: list[StreamSpec], timeline: Timeline, base_url: str,
              on_asyncio: bool = False):
    """Runner of the SDK floor: AsyncOpenAI streams read as the app reads them, and
    nothing else (the content of each chunk kept with its receive time). ``on_asyncio``:
    the SDK's HTTP client on the app's transport (chat.generation.providers.transport) instead of
    httpcore2's anyio backend (the ``sdk-asyncio`` floor: that transport's own cost)."""
    import openai

    if on_asyncio:
        # chat.generation's package imports the models: Django must be set up first.
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatproject.settings")
        import django
        django.setup()
        from chat.generation.providers import transport

    async def read(spec, chunks, state):
        client = clients[0]
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": spec.tag}], stream=True,
            stream_options={"include_usage": True}, max_tokens=spec.tokens + 10,
        )
        async with stream:
            async for chunk in stream:
                for choice in chunk.choices:
                    if choice.delta and choice.delta.content:
                        chunks.append((time.monotonic(), time.time(), choice.delta.content))
        state["end_status"] = "completed"

    clients: list = []

    async def run(t0: float) -> list[dict]:
        http_client = openai.DefaultAsyncHttpxClient(transport=transport.AsyncioTransport(
            limits=httpx2_limits())) if on_asyncio else None
        clients.append(openai.AsyncOpenAI(base_url=base_url, api_key="bench-key-not-secret",
                                          max_retries=0, timeout=600,
                                          http_client=http_client))
        deadline = t0 + timeline.deadline
        try:
            return await asyncio.gather(*(floor_stream(read, s, t0, deadline) for s in specs))
        finally:
            await clients[0].close()

    return run


def httpx2_limits():
    """The openai SDK's connection limits (openai._constants.DEFAULT_CONNECTION_LIMITS)."""
    import httpx2
    return httpx2.Limits(max_connections=1000, max_keepalive_connections=100)


def httpx_floor(specs: list[StreamSpec], timeline: Timeline, base_url: str):
    """Runner of the raw floor: httpx2 (the HTTP client the openai SDK uses) streaming
    the response, SSE ``data:`` lines parsed with stdlib ``json``, nothing else."""
    import httpx2

    async def read(spec, chunks, state):
        body = {"model": MODEL, "messages": [{"role": "user", "content": spec.tag}],
                "stream": True, "stream_options": {"include_usage": True},
                "max_tokens": spec.tokens + 10}
        async with http[0].stream(
            "POST", f"{base_url}/chat/completions", json=body,
            headers={"Authorization": "Bearer bench-key-not-secret"},
        ) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                for choice in json.loads(data).get("choices") or ():
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        chunks.append((time.monotonic(), time.time(), content))
        state["end_status"] = "completed"

    http: list = []

    async def run(t0: float) -> list[dict]:
        http.append(httpx2.AsyncClient(timeout=None, limits=httpx2.Limits(
            max_connections=None, max_keepalive_connections=None)))
        deadline = t0 + timeline.deadline
        try:
            return await asyncio.gather(*(floor_stream(read, s, t0, deadline) for s in specs))
        finally:
            await http[0].aclose()

    return run


# --- figures of one row -----------------------------------------------------------------
def summarize(config: str, k: int, specs: list[StreamSpec], results: list[dict],
              requests: list[dict], timeline: Timeline, t0: float, rate: float,
              cpu_s: dict[str, float], measured: str,
              cpu_whole_s: dict[str, float] | None = None) -> dict:
    """The row's figures (see the module docstring). ``requests`` are the upstream's
    records of this row's streams; ``cpu_s`` the CPU seconds used over the window, by
    process group; ``measured`` names the group whose CPU the row is about;
    ``cpu_whole_s`` the CPU seconds used from t0 until every stream was over (for
    ``cpu_per_1000_tokens_whole_s``: over every token of the row, whenever received)."""
    w0, w1 = (t0 + x for x in timeline.window)
    window_s = w1 - w0
    lags: list[float] = []
    delivered = 0
    for result in results:
        for at, lag in zip(result["received_at"], result["lags_ms"], strict=True):
            if w0 <= at <= w1:
                delivered += 1
                lags.append(lag)
    offered = offered_tokens(specs, timeline, rate)
    ttft = [(r["first_at"] - r["sent_at"]) * 1000 for r in results
            if r["first_at"] is not None and r["sent_at"] is not None]
    # App rows: the stream's planned start -> its socket open (handshake, session).
    opens = [r["open_ms"] for r in results if r.get("open_ms") is not None]
    by_tag = {r["tag"]: r for r in requests}
    stop_ms: list[float] = []
    after_stop = 0
    not_closed = 0
    for result in results:
        if result["stop_sent_at"] is None or not result["admitted"]:
            continue
        request = by_tag.get(result["tag"])
        if request is None or request["client_closed_at"] is None:
            not_closed += 1
            continue
        stop_ms.append((request["client_closed_at"] - result["stop_sent_at"]) * 1000)
        after_stop += sum(1 for at in request["recent_chunk_times"]
                          if at > result["stop_sent_at"])
    lost = duplicated = 0
    for result, spec in zip(results, specs, strict=True):
        got = result["tokens"]
        duplicated += len(got) - len(set(got))
        if result["end_status"] == "completed":
            asked = TOKENS_RE.search(result["tag"] or spec.tag)
            lost += len(set(range(int(asked[1]) if asked else spec.tokens)) - set(got))
    # Refused for good is not failed; nor is a stream stopped before its first token.
    refused_for_good = [r for r in results if not r["admitted"] and r["refused"]]
    reasons: dict[str, int] = {}
    for result in results:
        for reason, count in result.get("refused_reasons", {}).items():
            reasons[reason] = reasons.get(reason, 0) + count
    # A stream still coming back after refusals at the deadline is refused, not late;
    # one neither admitted nor refused failed (a socket that did not open, say).
    failed = [r for r in results
              if (r["admitted"] and (r["error"] or r["timed_out"]
                                     or (r["first_at"] is None and r["stop_sent_at"] is None)))
              or (not r["admitted"] and not r["refused"])]
    unfinished = sum(1 for r in failed if r["timed_out"])
    cpu = cpu_s.get(measured, 0.0)
    all_tokens = sum(len(r["received_at"]) for r in results)
    cpu_whole = (cpu_whole_s or {}).get(measured)
    statuses: dict[str, int] = {}
    for result in results:
        key = str(result["end_status"])
        statuses[key] = statuses.get(key, 0) + 1
    return {
        "config": config,
        "label": LABELS.get(config, config),
        "k": k,
        "window_s": round(window_s, 2),
        "cpu_s": {name: round(value, 2) for name, value in cpu_s.items()},
        "cpu_per_1000_tokens_s": round(cpu / delivered * 1000, 3) if delivered else None,
        # Cores the measured process(es) used over the window: well under 1 with a lag
        # that grows means the machine, not the worker's code, was the limit.
        "cores_used": round(cpu / window_s, 2),
        "cpu_whole_s": {name: round(value, 2) for name, value in (cpu_whole_s or {}).items()},
        "tokens_whole": all_tokens,
        "cpu_per_1000_tokens_whole_s": (round(cpu_whole / all_tokens * 1000, 3)
                                        if all_tokens and cpu_whole is not None else None),
        "delivered_tokens": delivered,
        "delivered_tps": round(delivered / window_s, 1),
        "offered_tps": round(offered / window_s, 1),
        "delivered_pct": round(100 * delivered / offered, 1) if offered else None,
        "lag_ms": {"p50": percentile(lags, 50), "p99": percentile(lags, 99),
                   "max": max(lags) if lags else None},
        "ttft_ms": {"p50": percentile(ttft, 50), "p99": percentile(ttft, 99), "n": len(ttft)},
        "open_ms": {"p50": percentile(opens, 50), "p99": percentile(opens, 99),
                    "n": len(opens)},
        "stop_to_upstream_close_ms": {"p50": percentile(stop_ms, 50),
                                      "p99": percentile(stop_ms, 99), "n": len(stop_ms),
                                      "not_closed": not_closed},
        "chunks_after_stop": after_stop,
        # overloaded frames received (clients retry after retry_after_ms), and the
        # streams refused until their end (never admitted).
        "refused_overloaded": sum(r["refused"] for r in results),
        "refused_streams": len(refused_for_good),
        "refused_reasons": reasons,
        "retried_streams": sum(1 for r in results if r["refused"] and r["admitted"]),
        "failed": len(failed),
        "unfinished": unfinished,
        "errors": len(failed) - unfinished,
        "failed_samples": sorted({str(r["error"] or ("timed out" if r["timed_out"]
                                                     else "no delta"))
                                  for r in failed})[:5],
        "statuses": statuses,
        "lost_tokens": lost,
        "duplicated_tokens": duplicated,
        "upstream_requests": len(requests),
    }


def _fmt_s(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def table(rows: list[dict]) -> str:
    """The rows as the markdown table of docs/performance.md (plus refused and failed)."""
    head = ("| system | K | CPU s / 1000 tok | cores used (waiting) "
            "| delivered / offered tok/s "
            "| lag p50 / p99 "
            "| TTFT p50 | stop → upstream close p50 / p99 (n) | chunks after stop "
            "| refusals (streams never admitted) | unfinished / errors |")
    if any(r.get("stop_via") == "other-worker" for r in rows):
        head = head.replace("| stop → upstream close",
                            "| stop from another worker's tab → upstream close")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        stop = r["stop_to_upstream_close_ms"]
        stop_text = (f"{fmt_ms(stop['p50'])} / {fmt_ms(stop['p99'])} ({stop['n']})"
                     if stop["n"] else "n/a")
        if stop["not_closed"]:
            stop_text += f", {stop['not_closed']} not closed"
        wait = r.get("cpu_wait_share")
        waiting = "" if wait is None else f" ({wait:.2f})"
        lines.append(
            f"| {r['label']}{' *' if r.get('profiled') else ''} | {r['k']} "
            f"| {_fmt_s(r['cpu_per_1000_tokens_s'])} | {r['cores_used']:.2f}{waiting} "
            f"| {r['delivered_tps']:.0f} / {r['offered_tps']:.0f} "
            f"| {fmt_ms(r['lag_ms']['p50'])} / {fmt_ms(r['lag_ms']['p99'])} "
            f"| {fmt_ms(r['ttft_ms']['p50'])} | {stop_text} | {r['chunks_after_stop']} "
            f"| {r['refused_overloaded']} ({r.get('refused_streams', 0)}) "
            f"| {r['unfinished']} / {r['errors']} |"
        )
    return "\n".join(lines)


# --- profiles ---------------------------------------------------------------------------
def burst_table(rows: list[dict]) -> str:
    """The rows of a ``--burst`` run: what the K messages sent in one instant got."""
    lines = ["| system | K | refused (reasons) | tokens delivered | TTFT p50 / p99 "
             "| lag p50 / p99 | CPU s / 1000 tok | cores used (waiting) | unfinished / errors |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(r["refused_reasons"].items()))
        wait = r.get("cpu_wait_share")
        lines.append(
            f"| {r['label']} | {r['k']} | {r['refused_overloaded']}"
            f"{f' ({reasons})' if reasons else ''} | {r['delivered_pct']} % "
            f"| {fmt_ms(r['ttft_ms']['p50'])} / {fmt_ms(r['ttft_ms']['p99'])} "
            f"| {fmt_ms(r['lag_ms']['p50'])} / {fmt_ms(r['lag_ms']['p99'])} "
            f"| {_fmt_s(r['cpu_per_1000_tokens_s'])} "
            f"| {r['cores_used']:.2f}{'' if wait is None else f' ({wait:.2f})'} "
            f"| {r['unfinished']} / {r['errors']} |")
    return "\n".join(lines)


def _frame_key(frame: str) -> tuple[str, str]:
    """``"construct_type (/x/site-packages/openai/_models.py:412)"`` ->
    ``("construct_type", "/x/site-packages/openai/_models.py")``."""
    name, _, where = frame.rpartition(" (")
    if not name:
        return frame, ""
    return name, where.rstrip(")").rsplit(":", 1)[0]


STDLIB_RE = re.compile(r"/lib/python3\.\d+/(.+?)(?:/__init__)?\.py$")


def _group_of(path: str) -> str:
    """Where a frame's code lives: ``openai``, ``channels/layers.py``, ``chat/consumers.py``,
    ``asyncio``, ``stdlib typing``, ``stdlib concurrent.futures``..."""
    if "site-packages/" in path:
        rest = path.split("site-packages/", 1)[1]
        package = rest.split("/", 1)[0].removesuffix(".py")
        if package == "channels" and "/" in rest:
            return "channels/" + rest.split("/", 1)[1]
        return package
    if f"{ROOT}/" in path:
        return path.split(f"{ROOT}/", 1)[1]
    stdlib = STDLIB_RE.search(path)
    if stdlib:
        parts = stdlib.group(1).split("/")
        return "asyncio" if parts[0] == "asyncio" else "stdlib " + ".".join(parts[:2])
    return path or "?"


def profile_summary(raw_path: Path, top: int = 25) -> dict:
    """Shares of the samples in a py-spy raw (collapsed stacks) file: by function where
    the CPU was (self), by function on the stack (inclusive), and by package or module
    (self and inclusive). Shares are fractions of all non-idle samples."""
    self_fn: dict[str, int] = {}
    incl_fn: dict[str, int] = {}
    self_group: dict[str, int] = {}
    incl_group: dict[str, int] = {}
    total = 0
    for line in raw_path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_frame_key(f) for f in stack.split(";") if f]
        if not frames:
            continue
        leaf_name, leaf_path = frames[-1]
        leaf = f"{leaf_name} ({_group_of(leaf_path)})"
        self_fn[leaf] = self_fn.get(leaf, 0) + count
        group = _group_of(leaf_path)
        self_group[group] = self_group.get(group, 0) + count
        for key in {f"{n} ({_group_of(p)})" for n, p in frames}:
            incl_fn[key] = incl_fn.get(key, 0) + count
        for key in {_group_of(p) for _, p in frames}:
            incl_group[key] = incl_group.get(key, 0) + count

    def ranked(counts: dict[str, int]) -> list[tuple[str, float]]:
        ordered = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
        return [(name, round(n / total, 4)) for name, n in ordered] if total else []

    return {"samples": total, "self": ranked(self_fn), "inclusive": ranked(incl_fn),
            "self_by_group": ranked(self_group), "inclusive_by_group": ranked(incl_group)}


def profile_text(summary: dict, title: str) -> str:
    """The summary of :func:`profile_summary` as text."""
    out = [title, f"{summary['samples']} samples (py-spy, 100 Hz, non-idle)", ""]
    for key, heading in (("self_by_group", "self time by package/module"),
                         ("inclusive_by_group", "inclusive time by package/module"),
                         ("self", "top functions, self time"),
                         ("inclusive", "top functions, inclusive time")):
        out.append(heading)
        out.extend(f"  {share * 100:5.1f} %  {name}" for name, share in summary[key])
        out.append("")
    return "\n".join(out)


class Profiler:
    """py-spy on one process for ``duration`` s: a flame graph SVG and raw stacks."""

    def __init__(self, pid: int, duration: float, stem: str):
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        ARTIFACTS.mkdir(exist_ok=True)
        self.svg = ARTIFACTS / f"{stem}.svg"
        self.raw = ARTIFACTS / f"{stem}.txt"
        self.top = ARTIFACTS / f"{stem}-top.txt"
        common = [spy, "record", "-p", str(pid), "-d", str(int(math.ceil(duration))),
                  "-r", "100", "--nonblocking", "--function"]
        # Two samplers, because py-spy writes one format per run; --nonblocking keeps
        # the worker from being paused for each sample.
        self.processes = [
            subprocess.Popen([*common, "-f", "flamegraph", "-o", str(self.svg)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
            subprocess.Popen([*common, "--full-filenames", "-f", "raw", "-o", str(self.raw)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE),
        ]

    def finish(self, title: str) -> dict | None:
        for process in self.processes:
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                stop_process(process)
        if not self.raw.exists():
            error = self.processes[1].stderr.read().decode(errors="replace")
            print(f"py-spy wrote no profile: {error[-500:]}", file=sys.stderr)
            return None
        summary = profile_summary(self.raw)
        self.top.write_text(profile_text(summary, title))
        return {"svg": str(self.svg), "raw": str(self.raw), "top": str(self.top), **summary}


# --- the harness ------------------------------------------------------------------------
class Harness:
    """The upstream (started on enter) and the runs of rows, one after the other."""

    def __init__(self, *, rate: float = 20.0, workers: int = 1, client_procs: int = 0,
                 postgres: str = "postgres://postgres@127.0.0.1:5432", database: str = "tp",
                 redis: str = "redis://127.0.0.1:6379/7", channel_prefix: str = "tp",
                 conn_max_age: int = 60, worker_env: dict[str, str] | None = None,
                 stop_share: float = 0.1, seed: int = 1, quiet: bool = False,
                 stop_via: str = "owner", burst: bool = False):
        self.rate = rate
        # Every message in the same instant, over sockets opened before; no retry.
        self.burst = burst
        self.workers = workers
        self.client_procs = client_procs
        self.postgres = postgres
        self.database = database
        self.redis = redis
        self.channel_prefix = channel_prefix
        self.conn_max_age = conn_max_age
        self.worker_env = worker_env or {}
        self.stop_share = stop_share
        self.stop_via = stop_via
        self.seed = seed
        self.quiet = quiet
        self.logs = ARTIFACTS / "throughput"
        self.tmp = Path(tempfile.mkdtemp(prefix="tp-bench-"))
        self.upstream: subprocess.Popen | None = None
        self.upstream_port = 0
        self.prepared: dict[str, tuple[dict, list[str]]] = {}
        self.used_redis = False
        self.run_id = uuid.uuid4().hex[:6]
        # One key for the whole run: the sessions made by prepare() are signed with it.
        self.secret_key = "tp-" + secrets.token_urlsafe(50)
        self.rows_done = 0

    def __enter__(self) -> Harness:
        self.upstream_port = free_port()
        self.upstream = start_upstream(
            self.upstream_port, {**os.environ, "PYTHONUNBUFFERED": "1"},
            self.logs / "upstream.log", tokens_per_second=self.rate, tokens=100,
        )
        return self

    def __exit__(self, *exc) -> None:
        if self.upstream is not None:
            stop_process(self.upstream)
        if self.used_redis:
            with contextlib.suppress(Exception):
                cleanup_redis(self.redis, self.channel_prefix)
        shutil.rmtree(self.tmp, ignore_errors=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.upstream_port}/v1"

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"{time.strftime('%H:%M:%S')} {text}", flush=True)

    # -- configurations --------------------------------------------------------------
    def env_of(self, config: str, max_tokens: int) -> dict:
        """The workers' environment for an app configuration."""
        env = {**os.environ,
               **app_env(self.upstream_port, max_tokens, secret_key=self.secret_key)}
        if config == "defaults":
            env.update({"DATABASE_URL": "", "REDIS_URL": "",
                        "SQLITE_PATH": str(self.tmp / "defaults.sqlite3")})
        elif config == "postgres":
            env.update({
                "DATABASE_URL": f"{self.postgres}/{self.database}",
                "DATABASE_CONN_MAX_AGE": str(self.conn_max_age),
                "REDIS_URL": self.redis, "CHANNEL_LAYER": "pubsub",
                "CHANNEL_PREFIX": self.channel_prefix,
            })
        else:
            raise ValueError(f"unknown app configuration {config!r}")
        env.update(self.worker_env)
        return env

    def prepare(self, config: str, users: int) -> None:
        """A fresh database for ``config`` with ``users`` users (one per stream of every
        K to come and per warm-up run: a run never waits for another's ``streaming``
        row)."""
        env = self.env_of(config, 0)
        if config == "postgres":
            recreate_database(self.postgres, self.database)
            self.used_redis = True
            cleanup_redis(self.redis, self.channel_prefix)
        else:
            Path(env["SQLITE_PATH"]).unlink(missing_ok=True)
        started = time.monotonic()
        cookies = prepare_database(env, users, prefix=f"tp{self.run_id}-")
        self.prepared[config] = (env, cookies)
        self.say(f"[{config}] database ready, {users} users ({time.monotonic() - started:.1f} s)")

    def take_cookies(self, config: str, k: int) -> list[str]:
        env, cookies = self.prepared[config]
        if len(cookies) < k:
            raise RuntimeError(f"{config}: {len(cookies)} users left, {k} needed")
        self.prepared[config] = (env, cookies[k:])
        return cookies[:k]

    # -- rows ------------------------------------------------------------------------
    def _requests(self, run_tag: str) -> dict:
        return upstream_stats(self.upstream_port, f"{run_tag}-")

    def _wait_upstream_idle(self, run_tag: str, timeout: float = 20) -> int:
        """Open upstream streams of the row left after ``timeout`` s (0 when idle)."""
        deadline = time.monotonic() + timeout
        while True:
            open_streams = self._requests(run_tag)["open_streams"]
            if not open_streams or time.monotonic() > deadline:
                return open_streams
            time.sleep(0.2)

    def run(self, config: str, k: int, duration: float, *, settle: float = 2.0,
            profile: bool = False) -> dict:
        """One row: configuration ``config`` (app or floor) at ``k`` streams, a window of
        ``duration`` s (see the module docstring); returns its figures (:func:`summarize`
        plus CPU of every process group, load averages, the profile)."""
        return self.run_together([config], k, duration, settle=settle,
                                 profile=config if profile else None)[0]

    def run_together(self, configs: list[str], k: int, duration: float, *,
                     settle: float = 2.0, grace: float = 4.0,
                     profile: str | None = None) -> list[dict]:
        """Rows of several configurations run at the same time, over one window: each
        with its own workers or floor process and its own ``k`` streams from the one
        upstream. Sharing the window, they share the machine's conditions too (the
        guard's ratio); the bench's table runs one configuration at a time. ``profile``:
        the configuration whose (first) worker or floor process py-spy records;
        ``grace``: seconds streams may run late (after their last token was due) before
        being closed."""
        timeline = Timeline.for_k(k, duration, settle, grace, burst=self.burst)
        load_before = os.getloadavg()
        started = time.monotonic()
        parts = []
        try:
            for config in configs:
                part = {"config": config, "run_tag": f"tp{self.run_id}r{self.rows_done}",
                        "children": [], "processes": []}
                self.rows_done += 1
                parts.append(part)
                self._set_up(part, k, timeline)
            for part in parts:
                for child in part["children"]:
                    child.wait_ready()
            groups = {}
            for part in parts:
                config = part["config"]
                groups[f"{config}:{part['measured']}"] = part["pids"]
                if config not in FLOORS:
                    groups[f"{config}:clients"] = [c.pid for c in part["children"]]
            groups["upstream"] = [self.upstream.pid]
            t0 = time.monotonic() + 0.3
            for part in parts:
                for child in part["children"]:
                    child.go(t0)
            time.sleep(max(0.0, t0 - time.monotonic()))
            at_start = cpu_snapshot(groups)
            w0, w1 = (t0 + x for x in timeline.window)
            time.sleep(max(0.0, w0 - time.monotonic()))
            before = cpu_snapshot(groups)
            waited_before = wait_snapshot(groups)
            profiler = None
            for part in parts:
                if part["config"] == profile:
                    profiler = Profiler(part["pids"][0], timeline.duration,
                                        f"profile-{profile}-K{k}")
            time.sleep(max(0.0, w1 - time.monotonic()))
            after = cpu_snapshot(groups)
            waited_after = wait_snapshot(groups)
            for part in parts:
                results = []
                for child in part["children"]:
                    results.extend(child.result(timeout=timeline.deadline + 60))
                part["results"] = sorted(results, key=lambda r: r["index"])
            at_end = cpu_snapshot(groups)
            for part in parts:
                part["left_open"] = self._wait_upstream_idle(part["run_tag"])
                part["requests"] = self._requests(part["run_tag"])["requests"]
        finally:
            for part in parts:
                for child in part["children"]:
                    child.stop()
                for process in part["processes"]:
                    stop_process(process)
        load_after = [round(x, 2) for x in os.getloadavg()]
        rows = []
        for part in parts:
            config = part["config"]
            names = [name for name in groups if name.startswith(f"{config}:")]
            names.append("upstream")
            cpu_s = {name.split(":")[-1]: after[name] - before[name] for name in names}
            cpu_whole_s = {name.split(":")[-1]: at_end[name] - at_start[name] for name in names}
            row = summarize(config, k, part["specs"], part["results"], part["requests"],
                            timeline, t0, self.rate, cpu_s, part["measured"],
                            cpu_whole_s=cpu_whole_s)
            measured = f"{config}:{part['measured']}"
            # Runnable but not running: the share of the window the machine made it wait.
            row["cpu_wait_share"] = round(
                (waited_after[measured] - waited_before[measured]) / row["window_s"], 2)
            row["upstream_left_open"] = part["left_open"]
            row["workers"] = self.workers if config in APP_CONFIGS else 0
            row["stop_via"] = self.stop_via if config in APP_CONFIGS else "owner"
            row["burst"] = self.burst
            row["together_with"] = [c for c in configs if c != config]
            row["load_average"] = {"before": [round(x, 2) for x in load_before],
                                   "after": load_after}
            row["elapsed_s"] = round(time.monotonic() - started, 1)
            if profiler is not None and config == profile:
                row["profiled"] = True
                row["profile"] = profiler.finish(
                    f"py-spy profile: {LABELS.get(config, config)}, K={k}, "
                    f"{timeline.duration:g} s window"
                )
            self.say(f"[{config} K={k}] CPU/1000 tok {_fmt_s(row['cpu_per_1000_tokens_s'])} s, "
                     f"delivered {row['delivered_tps']:.0f}/{row['offered_tps']:.0f} tok/s, "
                     f"lag p99 {fmt_ms(row['lag_ms']['p99'])}, failed {row['failed']}, "
                     f"socket open p50/p99 {fmt_ms(row['open_ms']['p50'])}/"
                     f"{fmt_ms(row['open_ms']['p99'])} "
                     f"({row['elapsed_s']} s, load {load_after[0]})")
            rows.append(row)
        return rows

    def _set_up(self, part: dict, k: int, timeline: Timeline) -> None:
        """Start what one configuration needs (workers and clients, or the floor
        process); fills ``part`` with its specs, processes, and measured pids."""
        config, run_tag = part["config"], part["run_tag"]
        if config in FLOORS:
            part["specs"] = make_specs(k, run_tag, timeline, self.rate,
                                       stop_share=self.stop_share, seed=self.seed)
            runner = {"sdk": sdk_floor, "httpx": httpx_floor,
                      "sdk-asyncio": functools.partial(sdk_floor, on_asyncio=True)}[config]
            part["children"].append(Child(_child_main, runner, part["specs"], timeline,
                                          self.base_url,
                                          log_path=self.logs / f"{config}-floor.log"))
            part["measured"], part["pids"] = "floor", [part["children"][0].pid]
            return
        if config == "chainlit":
            self._set_up_chainlit(part, k, timeline)
            return
        max_tokens = math.ceil(timeline.deadline * self.rate) + 10
        env = self.env_of(config, max_tokens)
        ports = []
        for n in range(self.workers):
            port = free_port()
            part["processes"].append(start_daphne(port, env, self.logs / f"{config}-w{n}.log"))
            ports.append(port)
        cookies = self.take_cookies(config, k + len(ports))
        part["specs"] = make_specs(k, run_tag, timeline, self.rate,
                                   stop_share=self.stop_share, seed=self.seed, ports=ports,
                                   cookies=cookies[len(ports):], stop_via=self.stop_via)
        n_clients = self.client_procs or max(1, math.ceil(k / 200))
        # The clients import while the workers start.
        for shard in range(n_clients):
            part["children"].append(Child(_child_main, app_clients,
                                          part["specs"][shard::n_clients], timeline,
                                          not self.burst,
                                          log_path=self.logs / "clients.log"))
        for port, worker, cookie in zip(ports, part["processes"], cookies, strict=False):
            wait_port(port, worker, f"{config} worker on {port}")
            asyncio.run(warm_up(port, cookie, f"{run_tag}-warm-up tokens=2"))
        part["measured"], part["pids"] = "workers", [p.pid for p in part["processes"]]

    def _set_up_chainlit(self, part: dict, k: int, timeline: Timeline) -> None:
        """The ``chainlit`` row: a fresh Chainlit server (its own virtualenv,
        ``bench.chainlit_client``) with the app's model and max tokens, and its client
        processes; the first client warms the server up before it reports ready."""
        python = chainlit_client.chainlit_python()
        if python is None:
            raise RuntimeError(chainlit_client.missing_message())
        run_tag = part["run_tag"]
        port = free_port()
        part["processes"].append(chainlit_client.start_server(
            python, port, upstream_port=self.upstream_port, model=MODEL,
            max_tokens=math.ceil(timeline.deadline * self.rate) + 10,
            app_root=self.tmp / f"chainlit-{run_tag}", log_path=self.logs / "chainlit.log",
        ))
        part["specs"] = make_specs(k, run_tag, timeline, self.rate,
                                   stop_share=self.stop_share, seed=self.seed)
        n_clients = self.client_procs or max(1, math.ceil(k / 200))
        for shard in range(n_clients):
            part["children"].append(Child(
                _child_main, chainlit_client.chainlit_clients,
                part["specs"][shard::n_clients], timeline, port,
                f"{run_tag}-warm-up tokens=2" if shard == 0 else None,
                log_path=self.logs / "chainlit-clients.log", python=python))
        part["measured"], part["pids"] = "server", [part["processes"][0].pid]


# --- command line -------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m bench.throughput", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--ks", default="50,100,200,300,400",
                        help="comma-separated numbers of concurrent streams")
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                        help=f"comma-separated, among {', '.join(ALL_CONFIGS)}")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds of the measurement window of each row "
                        "(20; 5 with --burst)")
    parser.add_argument("--settle", type=float, default=None,
                        help="seconds between the last stream's start and the window "
                        "(2; 3 with --burst)")
    parser.add_argument("--burst", action="store_true",
                        help="every stream's message in the same instant, over sockets "
                        "opened before (K/50 s, at least 2), with no retry after a "
                        "refusal; prints refusals, tokens delivered, TTFT p50/p99, lag")
    parser.add_argument("--rate", type=float, default=20, help="tokens/s of every stream")
    parser.add_argument("--workers", type=int, default=1, help="daphne workers (app rows)")
    parser.add_argument("--client-procs", type=int, default=0,
                        help="client processes (default: one per 200 streams)")
    parser.add_argument("--stop-share", type=float, default=0.1,
                        help="share of the streams stopped during the window")
    parser.add_argument("--stop-via", choices=("owner", "other-worker"), default="owner",
                        help="who sends the stop: the owner's socket, or a second tab on "
                        "another worker (a cross-process stop; needs --workers 2+)")
    parser.add_argument("--worker-env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment of the workers (repeatable)")
    parser.add_argument("--postgres", default="postgres://postgres@127.0.0.1:5432")
    parser.add_argument("--database", default="tp", help="PostgreSQL database (recreated)")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/7")
    parser.add_argument("--channel-prefix", default="tp")
    parser.add_argument("--conn-max-age", type=int, default=60,
                        help="DATABASE_CONN_MAX_AGE of the workers (postgres)")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy on the worker during one row")
    parser.add_argument("--profile-k", type=int, default=200)
    parser.add_argument("--profile-config", default=None,
                        help="configuration to profile (default: the first selected)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", help="also write every figure to this file")
    parser.add_argument("--show", metavar="FILE",
                        help="print the table of a --json file and exit (runs nothing)")
    args = parser.parse_args(argv)
    if args.duration is None:
        args.duration = 5.0 if args.burst else 20.0
    if args.settle is None:
        args.settle = 3.0 if args.burst else 2.0
    args.ks = [int(k) for k in args.ks.split(",") if k.strip()]
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = set(args.configs) - set(ALL_CONFIGS)
    if unknown:
        parser.error(f"unknown configurations {sorted(unknown)}; use {', '.join(ALL_CONFIGS)}")
    if any(k < 1 for k in args.ks):
        parser.error("every K must be at least 1")
    try:
        args.worker_env = dict(item.split("=", 1) for item in args.worker_env)
    except ValueError:
        parser.error("--worker-env takes NAME=VALUE")
    if args.stop_via == "other-worker" and args.workers < 2:
        parser.error("--stop-via other-worker needs --workers 2 or more")
    if args.profile:
        args.profile_config = args.profile_config or args.configs[0]
        if args.profile_config not in args.configs or args.profile_k not in args.ks:
            parser.error("--profile needs --profile-config among --configs and "
                         "--profile-k among --ks")
    return args


def header(data: dict) -> str:
    """The line above the table: what was run, on what, under what load."""
    a = data["args"]
    load = data["load_average_end"]
    return (f"bench.throughput: {a['rate']:g} tokens/s per stream, {a['workers']} worker(s), "
            f"window {a['duration']:g} s per row, {round(a['stop_share'] * 100)} % of "
            f"streams stopped; {data['cores']} cores, load average {load[0]} / {load[1]} / "
            f"{load[2]} at the end; {data['elapsed_s']:.0f} s in all")


def report(data: dict) -> str:
    """Header, table and notes of a run (what :func:`main` prints)."""
    rows = data["rows"]
    burst = data["args"].get("burst")
    out = [header(data) + ("; --burst: every message in the same instant, no retry"
                           if burst else ""),
           burst_table(rows) if burst else table(rows)]
    if any(r.get("profiled") for r in rows):
        out.append("* profiled with py-spy during this row (--nonblocking, 100 Hz)")
    for row in rows:
        if (row.get("workers") or 0) > 1:
            out.append(f"  {row['label']} K={row['k']}, {row['workers']} workers: "
                       f"{row['lost_tokens']} tokens lost, {row['duplicated_tokens']} "
                       f"duplicated (completed streams), stop sent by "
                       f"{row.get('stop_via', 'owner')}")
        if row["lost_tokens"] or row["duplicated_tokens"] or row["upstream_left_open"]:
            out.append(f"! {row['label']} K={row['k']}: {row['lost_tokens']} tokens lost, "
                       f"{row['duplicated_tokens']} duplicated, {row['upstream_left_open']} "
                       f"upstream streams left open")
        if row.get("profile"):
            out.append(f"profile of {row['label']} K={row['k']}: {row['profile']['svg']}, "
                       f"{row['profile']['top']}")
    return "\n".join(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.show:
        print(report(json.loads(Path(args.show).read_text())))
        return 0
    started = time.monotonic()
    rows = []
    if "chainlit" in args.configs and chainlit_client.chainlit_python() is None:
        print(chainlit_client.missing_message(), file=sys.stderr)
        args.configs = [c for c in args.configs if c != "chainlit"]
    with Harness(rate=args.rate, workers=args.workers, client_procs=args.client_procs,
                 postgres=args.postgres, database=args.database, redis=args.redis,
                 channel_prefix=args.channel_prefix, conn_max_age=args.conn_max_age,
                 worker_env=args.worker_env, stop_share=args.stop_share,
                 stop_via=args.stop_via, burst=args.burst,
                 seed=args.seed) as harness:
        for config in args.configs:
            if config in APP_CONFIGS:
                harness.prepare(config, sum(args.ks) + args.workers * len(args.ks))
            for k in args.ks:
                profile = args.profile and config == args.profile_config and k == args.profile_k
                rows.append(harness.run(config, k, args.duration, settle=args.settle,
                                        profile=profile))
    data = {
        "args": {k: v for k, v in vars(args).items() if k not in ("json", "show")},
        "cores": os.cpu_count(),
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "elapsed_s": round(time.monotonic() - started, 1),
        "rows": rows,
    }
    print()
    print(report(data))
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=2, default=str))
    return 0


if __name__ == "__main__":
    # Through the importable module, so that what goes to the client processes (pickled
    # by reference) is bench.throughput's, not __main__'s.
    from bench import throughput

    sys.exit(throughput.main())

