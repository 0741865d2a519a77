"""The ``chainlit`` row of ``python -m bench.throughput``: Chainlit's OpenAI streaming
example (``bench/chainlit_app.py``) under the same load as the app's rows.

    bash bench/chainlit_env.sh        # once: Chainlit's own virtualenv, outside the checkout
    python -m bench.throughput --ks 200 --configs defaults,chainlit --duration 10

What it starts, per K (loopback only, stopped at the end of the row):

- one Chainlit server (``chainlit run bench/chainlit_app.py --headless``: one uvicorn
  process, Chainlit's defaults) in the virtualenv of ``bench/chainlit_env.sh``,
  reading from the bench upstream; its CPU is the row's (group ``server``);
- client processes (``--client-procs``, default one per 200 streams) on that
  virtualenv's Python, holding one socket.io connection per stream
  (python-socketio's ``AsyncClient`` over aiohttp, websocket transport), each a
  session of its own, speaking as Chainlit's page does: connect with the page's
  ``auth`` (``sessionId``, ``clientType``, ``threadId``, ``userEnv``, ``chatProfile``),
  emit ``connection_successful``, wait for the chat start (its ``task_end``), emit
  ``client_message`` with the stream's tag as the user's text, read ``stream_start``
  (its ``output`` holds the first token) and ``stream_token`` (one per token), and take
  the answer's ``update_message`` and the ``task_end`` after it as its end. Stopped
  streams (``--stop-share``) emit ``stop``, what Chainlit's Stop button sends: the
  server cancels the handler's task.

Tokens are counted and timed as the other rows do (``bench.throughput.stream_result``):
each carries the upstream's index and wall-clock write time, lag = receive time - write
time. Nothing here imports Chainlit or socketio in the bench's own virtualenv: the
clients and the server run on the other one (:func:`chainlit_python`); this module's
top level is stdlib and ``bench.common``, so both interpreters import it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import subprocess
import time
import uuid
from pathlib import Path

from bench.common import ROOT, parse_tokens, sleep_until, wait_port

APP = ROOT / "bench" / "chainlit_app.py"
ENV_SCRIPT = "bench/chainlit_env.sh"
DEFAULT_VENV = Path.home() / ".cache" / "chat-bench" / "chainlit-venv"
# Environment variables Chainlit reads that would change what the example does here:
# a data layer (DATABASE_URL: the app rows' PostgreSQL; Literal AI), CI mode (fakes the
# OpenAI key), debug logging. The server gets a small environment of its own instead.
PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR")


def chainlit_python() -> Path | None:
    """The Python of Chainlit's virtualenv: ``CHAINLIT_PYTHON``, else
    ``~/.cache/chat-bench/chainlit-venv/bin/python``; None when it is not there."""
    path = Path(os.environ.get("CHAINLIT_PYTHON") or DEFAULT_VENV / "bin" / "python")
    return path if path.is_file() and os.access(path, os.X_OK) else None


def missing_message() -> str:
    """What to say when :func:`chainlit_python` finds nothing."""
    where = os.environ.get("CHAINLIT_PYTHON") or DEFAULT_VENV / "bin" / "python"
    return (f"chainlit: no Python at {where}; skipping the chainlit row. Create its "
            f"virtualenv (Chainlit 2.12.0, outside the checkout) with `bash {ENV_SCRIPT}`, "
            f"or point CHAINLIT_PYTHON at a Python that has chainlit, openai, "
            f"python-socketio and aiohttp.")


def start_server(python: Path, port: int, *, upstream_port: int, model: str,
                 max_tokens: int, app_root: Path, log_path: Path,
                 timeout: float = 60) -> subprocess.Popen:
    """Start ``chainlit run bench/chainlit_app.py`` on 127.0.0.1:``port`` against the
    bench upstream on ``upstream_port`` (model ``model``, at most ``max_tokens`` tokens
    per answer); Chainlit's files go to ``app_root``, its output to ``log_path``.
    Returns once it listens (RuntimeError, the process stopped, when it does not within
    ``timeout`` s: Chainlit's imports take a few seconds)."""
    app_root.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {name: os.environ[name] for name in PASSED_ENV if name in os.environ}
    env.update({
        "PYTHONUNBUFFERED": "1",
        "CHAINLIT_APP_ROOT": str(app_root),
        "OPENAI_BASE_URL": f"http://127.0.0.1:{upstream_port}/v1",
        "OPENAI_API_KEY": "bench-key-not-secret",
        "CHAINLIT_BENCH_MODEL": model,
        "CHAINLIT_BENCH_MAX_TOKENS": str(max_tokens),
    })
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(python), "-m", "chainlit", "run", str(APP), "--headless",
             "--host", "127.0.0.1", "--port", str(port)],
            cwd=app_root, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        wait_port(port, process, f"chainlit server on {port}", timeout=timeout)
    except BaseException:
        from bench.common import stop_process

        stop_process(process)
        raise
    return process


# --- the clients (run on Chainlit's virtualenv) ----------------------------------------
def _auth() -> dict:
    """The ``auth`` of Chainlit's page at connect (a new session, no thread to resume,
    no user environment, no chat profile)."""
    return {"clientType": "webapp", "sessionId": str(uuid.uuid4()), "threadId": "",
            "userEnv": "{}", "chatProfile": ""}


def _user_message(text: str) -> dict:
    """The ``client_message`` payload Chainlit's page sends for typed text."""
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
    return {"message": {"threadId": "", "id": str(uuid.uuid4()), "name": "User",
                        "type": "user_message", "output": text,
                        "createdAt": now.replace("+00:00", "Z"), "metadata": {}},
            "fileReferences": []}


class Session:
    """One socket.io connection to the Chainlit server and what it saw of one answer.
    Times are ``time.monotonic()`` s; ``lags_ms`` from the upstream's write (wall
    clock) to this client's receive (wall clock), parallel to ``received_at`` and
    ``tokens`` (the upstream's token indices)."""

    def __init__(self):
        import socketio

        # Compression offered as a browser offers it (Chromium asks every websocket
        # server for permessage-deflate; Chainlit's uvicorn accepts, daphne does not).
        compress = int(os.environ.get("CHAINLIT_BENCH_COMPRESS", "15"))
        self.sio = socketio.AsyncClient(
            reconnection=False,
            websocket_extra_options={"compress": compress} if compress else {})
        self.chat_started = asyncio.Event()
        self.ended = asyncio.Event()
        self.sent_at: float | None = None
        self.first_at: float | None = None
        self.message_id: str | None = None
        self.completed = False
        self.error: str | None = None
        self.leaving = False
        self.received_at: list[float] = []
        self.lags_ms: list[float] = []
        self.tokens: list[int] = []
        self._task_ends = 0
        for event in ("task_end", "stream_start", "stream_token", "update_message",
                      "new_message", "disconnect"):
            self.sio.on(event, getattr(self, f"_on_{event}"))

    async def open(self, port: int, timeout: float) -> None:
        """Connect as the page does and wait until the chat has started."""
        await self.sio.connect(f"http://127.0.0.1:{port}", socketio_path="/ws/socket.io",
                               transports=["websocket"], auth=_auth(),
                               wait_timeout=timeout)
        await self.sio.emit("connection_successful")
        await asyncio.wait_for(self.chat_started.wait(), timeout)

    async def send(self, text: str) -> None:
        self.sent_at = time.monotonic()
        await self.sio.emit("client_message", _user_message(text))

    async def close(self) -> None:
        self.leaving = True
        await self.sio.disconnect()

    def _take(self, text: str) -> None:
        now, mono = time.time(), time.monotonic()
        for index, stamp in parse_tokens(text):
            self.tokens.append(index)
            self.lags_ms.append((now - stamp) * 1000)
            self.received_at.append(mono)
        if self.tokens and self.first_at is None:
            self.first_at = mono

    async def _on_task_end(self, data=None) -> None:
        if self.sent_at is None:
            # Before the message: connection_successful's task_end, then on_chat_start's
            # (its history is set by then).
            self._task_ends += 1
            if self._task_ends >= 2:
                self.chat_started.set()
        else:
            self.ended.set()

    async def _on_stream_start(self, data) -> None:
        # Chainlit sends the first token inside the step of stream_start, the others
        # as stream_token; only one answer streams per session here.
        if self.message_id is None:
            self.message_id = data["id"]
            self._take(data.get("output") or "")

    async def _on_stream_token(self, data) -> None:
        if data.get("id") == self.message_id and not data.get("isSequence"):
            self._take(data.get("token") or "")

    async def _on_update_message(self, data) -> None:
        if self.message_id is not None and data.get("id") == self.message_id:
            self.completed = True

    async def _on_new_message(self, data) -> None:
        if data.get("isError"):
            self.error = f"error message: {str(data.get('output'))[:200]}"

    async def _on_disconnect(self, *reason) -> None:
        if not self.leaving:
            self.error = self.error or f"socket closed {reason}"
        self.chat_started.set()
        self.ended.set()


async def chainlit_stream(spec, t0: float, deadline: float, port: int) -> dict:
    """One stream (a ``bench.throughput.StreamSpec``): open a session at its start (a
    burst's at ``spec.open_at``), send its tag once the chat started (a burst's at
    ``spec.start``), maybe stop it, wait for the end; closed at ``deadline``
    (monotonic s) whatever happens. Returns ``bench.throughput.stream_result``."""
    from bench.throughput import stream_result

    opened_at = spec.open_at if spec.open_at is not None else spec.start
    await sleep_until(t0 + opened_at)
    session = Session()
    timed_out = False
    stop_sent_at = None
    open_ms = None
    try:
        async with asyncio.timeout(deadline - time.monotonic()):
            await session.open(port, timeout=deadline - time.monotonic())
            open_ms = (time.monotonic() - t0 - opened_at) * 1000
            await sleep_until(t0 + spec.start)
            await session.send(spec.tag)
            if spec.stop is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(session.ended.wait(),
                                           t0 + spec.stop - time.monotonic())
                if not session.ended.is_set():
                    stop_sent_at = time.monotonic()
                    await session.sio.emit("stop")
            await session.ended.wait()
    except TimeoutError:
        timed_out = True
    except Exception as exc:  # noqa: BLE001 - recorded, the bench goes on
        session.error = f"{type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await session.close()
    if session.completed and stop_sent_at is None:
        end_status = "completed"
    elif stop_sent_at is not None and session.ended.is_set():
        end_status = "cancelled"
    else:
        end_status = None
    return stream_result(
        spec, sent_at=session.sent_at, first_at=session.first_at,
        stop_sent_at=stop_sent_at, received_at=session.received_at,
        lags_ms=session.lags_ms, tokens=session.tokens, error=session.error,
        end_status=end_status, timed_out=timed_out, open_ms=open_ms,
    )


async def warm_up(port: int, tag: str, timeout: float = 60) -> None:
    """One short answer on a fresh server, so that the measured streams do not pay for
    its first-use costs (the SDK client's first request, lazy imports). RuntimeError
    when it does not complete."""
    session = Session()
    try:
        async with asyncio.timeout(timeout):
            await session.open(port, timeout)
            await session.send(tag)
            await session.ended.wait()
    finally:
        with contextlib.suppress(Exception):
            await session.close()
    if not session.completed or session.error:
        raise RuntimeError(f"the chainlit warm-up run ended without its answer: "
                           f"{session.error}")


def chainlit_clients(specs: list, timeline, port: int, warm_up_tag: str | None = None):
    """Runner of a client process (``bench.throughput._child_main``, on Chainlit's
    virtualenv) for ``specs`` against the server on ``port``; with ``warm_up_tag``, it
    first runs one warm-up answer under that tag (before it reports ready)."""
    import aiohttp  # noqa: F401 - imported before t0, not during the ramp
    import socketio  # noqa: F401

    if warm_up_tag:
        asyncio.run(warm_up(port, warm_up_tag))

    async def run(t0: float) -> list[dict]:
        deadline = t0 + timeline.deadline
        return await asyncio.gather(*(chainlit_stream(s, t0, deadline, port) for s in specs))

    return run
