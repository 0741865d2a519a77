"""A small OpenAI-compatible Chat Completions server: the built-in demo model.

It speaks enough HTTP/1.1 for the ``openai`` SDK (keep-alive, chunked transfer) and
streams server-sent events in the Chat Completions chunk format, with the final usage
chunk when the request asks for ``stream_options.include_usage`` (OpenAI API reference,
"Create chat completion", streaming). The app reaches it through the same SDK path as a
real provider, so the demo exercises the real streaming and cancel code.

It stops generating as soon as the client closes the connection and records every
request (chunks written, when the client closed): the loopback upstream of the tests and
of ``bench.load``. Failure modes: ``fail_status`` (an HTTP error), ``drop_after`` (cut
after N content chunks), ``fault`` (:data:`FAULTS`, seen from real providers and
proxies), ``dialect`` (:data:`DIALECTS`, a real provider's wire format: chat.demo_dialects
and, for the Responses API, chat.demo_responses).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .accounting import count_prompt_tokens
from .demo_dialects import DIALECTS, Speaker, check_dialect, extra_route, write_tokens
from .demo_dialects import rejection as dialect_rejection
from .demo_faults import FAULT_ERRORS, FAULTS, NO_CHOICES
from .demo_responses import ResponsesState
from .demo_responses_http import is_responses_path
from .demo_responses_http import serve as serve_responses

__all__ = ["DIALECTS", "FAULTS", "UpstreamRequest", "UpstreamServer", "demo_answer",
           "split_tokens"]

TOKEN_RE = re.compile(r"\s*\S+|\s+")
_ids = itertools.count(1)

@dataclass
class UpstreamRequest:
    """What the server saw of one ``/v1/chat/completions`` request (times: monotonic s)."""

    id: int
    body: dict
    started_at: float
    chunks_written: int = 0
    first_chunk_at: float | None = None
    client_closed_at: float | None = None
    finished_at: float | None = None
    completed: bool = False
    status: int = 200
    text_written: list[str] = field(default_factory=list)
    # Reasoning tokens generated (streamed, or hidden by openai-reasoning) before content.
    reasoning_written: list[str] = field(default_factory=list)
    generation_id: str = ""
    speaker: object = field(default=None, repr=False)  # chat.demo_dialects.Speaker

    @property
    def open(self) -> bool:
        """True while the server still streams this response to a connected client."""
        return self.finished_at is None and self.client_closed_at is None


def split_tokens(text: str) -> list[str]:
    """Split text into token-like pieces (a word with its leading white space)."""
    return TOKEN_RE.findall(text)


def demo_answer(messages: list[dict]) -> str:
    """A markdown answer of a few hundred tokens that reflects the last user message."""
    question = next((str(m.get("content") or "") for m in reversed(messages)
                     if m.get("role") == "user"), "")
    words = re.findall(r"[A-Za-z][A-Za-z'-]{3,}", question)
    keywords = sorted(dict.fromkeys(w.lower() for w in words), key=len, reverse=True)[:4]
    while len(keywords) < 3:
        keywords.append(["streaming", "cancellation", "accounting"][len(keywords)])
    topic = " ".join(question.split())[:80] or "your question"
    k1, k2, k3 = keywords[:3]
    rows = "\n".join(f"| {k} | {len(k)} | {k[::-1]} |" for k in keywords)
    return (
        f"## About: {topic}\n\n"
        f"This answer comes from the built-in **demo model**. It does not understand "
        f"questions, but it streams a realistic answer at a steady rate so you can try "
        f"streaming, the **Stop** button and usage accounting without an API key.\n\n"
        f"### What a real model would cover\n\n"
        f"- **{k1.capitalize()}**: what it means here, why it matters, and the usual "
        f"pitfalls people run into when they first meet it.\n"
        f"- **{k2.capitalize()}**: how it relates to {k1}, with a short worked example "
        f"and the trade-offs between the common approaches.\n"
        f"- **{k3.capitalize()}**: where to read more, and which questions to ask next.\n\n"
        f"### Your keywords at a glance\n\n"
        f"| Keyword | Letters | Backwards |\n|---|---|---|\n{rows}\n\n"
        f"### A code sample\n\n"
        f"```python\n"
        f"def summarize(text: str, limit: int = 3) -> list[str]:\n"
        f'    """Return the {k1!r}-related sentences, at most `limit` of them."""\n'
        f"    sentences = [s.strip() for s in text.split('.') if s.strip()]\n"
        f"    hits = [s for s in sentences if {k1!r} in s.lower()]\n"
        f"    return hits[:limit]\n"
        f"```\n\n"
        f"### Next steps\n\n"
        f"1. Set `OPENAI_API_KEY` (and `OPENAI_BASE_URL` for vLLM, Ollama or llama.cpp) "
        f"to talk to a real model.\n"
        f"2. Press **Stop** while an answer streams: the connection to the model is "
        f"closed at once, generation stops upstream, and you pay only for the tokens "
        f"that were produced.\n"
        f"3. Open this conversation in a second tab: both tabs show the same stream, "
        f"and either can stop it.\n\n"
        f"That is all the demo model has to say about *{k1}*, *{k2}* and *{k3}*. "
        f"Thank you for trying it, and have a good day."
    )


class UpstreamServer:
    """OpenAI-compatible streaming server on a loopback port.

    ``tokens_per_second`` paces content chunks; ``answer`` maps the request's messages
    to the answer text; ``fail_status`` answers every completion request with that HTTP
    status and an OpenAI-style error body whose message is ``fail_message``;
    ``split`` (text -> list of chunk texts, default :func:`split_tokens`) cuts the
    answer into content chunks; ``drop_after`` aborts the TCP connection after
    that many content chunks; ``response_delay`` (s) waits before the response headers
    (a slow provider); ``fault`` (one of :data:`FAULTS`, None for none) misbehaves the
    way it names, mid-stream ones after ``fault_after`` content chunks, ``rate_limited``
    with a Retry-After of ``retry_after`` s; ``dialect`` (one of :data:`DIALECTS`, None
    for OpenAI's reference format) speaks a provider's format, with a reasoning phase of
    ``reasoning_tokens`` paced like content, ``cached_tokens`` reported as cached (None:
    half the prompt) and OpenRouter's generation lookup answering 404 until
    ``generation_delay`` s after the stream ended. All may be changed between requests.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tokens_per_second: float = 25.0,
        answer: Callable[[list[dict]], str] | str = demo_answer,
        fail_status: int | None = None,
        fail_message: str = "upstream failure (test)",
        drop_after: int | None = None,
        response_delay: float = 0.0,
        model: str = "demo",
        fault: str | None = None,
        fault_after: int = 3,
        retry_after: float = 1,
        dialect: str | None = None,
        reasoning_tokens: int = 8,
        cached_tokens: int | None = None,
        generation_delay: float = 0.2,
    ):
        self.host = host
        self.port = port
        self.tokens_per_second = tokens_per_second
        self.answer = answer
        self.fail_status = fail_status
        self.fail_message = fail_message
        self.drop_after = drop_after
        self.response_delay = response_delay
        self.model = model
        self.fault = fault
        self.fault_after = fault_after
        self.retry_after = retry_after
        self.dialect = dialect
        self.reasoning_tokens = reasoning_tokens
        self.cached_tokens = cached_tokens
        self.generation_delay = generation_delay
        self.generations: dict[str, tuple] = {}  # OpenRouter id -> (record, speaker, model)
        self.split = split_tokens
        self.requests: list[UpstreamRequest] = []
        self.model_lists = 0  # GET /models requests served
        self.responses = ResponsesState()  # the "responses" dialect's (demo_responses)
        self._server: asyncio.base_events.Server | None = None
        self._handlers: set[asyncio.Task] = set()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def fault(self) -> str | None:
        """The fault every following request gets (one of :data:`FAULTS`) or None."""
        return self._fault

    @fault.setter
    def fault(self, value: str | None) -> None:
        if value is not None and value not in FAULTS:
            raise ValueError(f"unknown fault {value!r}; one of {FAULTS}")
        self._fault = value

    @property
    def dialect(self) -> str | None:
        """The wire format every following request gets (one of :data:`DIALECTS`)."""
        return self._dialect

    @dialect.setter
    def dialect(self, value: str | None) -> None:
        self._dialect = check_dialect(value)

    # -- lifecycle ------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>/v1``: what ``AsyncOpenAI(base_url=...)`` takes."""
        return f"http://{self.host}:{self.port}/v1"

    async def start(self) -> UpstreamServer:
        """Bind and serve on the running event loop (port 0 picks a free port)."""
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self.responses.close()
        if self._server is not None:
            self._server.close()
            # Python 3.11's Server.close() leaves accepted keep-alive connections open.
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    def start_in_thread(self) -> UpstreamServer:
        """Serve from a daemon thread with its own event loop; returns once bound."""
        ready = threading.Event()

        def run():
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self.start())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="upstream-server", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("upstream server did not start")
        return self

    def stop_thread(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self.stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    # -- inspection -------------------------------------------------------------------
    @property
    def open_streams(self) -> int:
        """Responses still being streamed to a connected client."""
        return sum(1 for r in self.requests if r.open)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Poll ``predicate`` (from any thread) until true or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.005)
        return predicate()

    async def until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Like :meth:`wait_for`, without blocking the calling event loop."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            await asyncio.sleep(0.005)
        return predicate()

    # -- HTTP -------------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        task = asyncio.current_task()
        self._handlers.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                method, path, _ = request_line.split(" ", 2)
                headers = {}
                for line in header_lines:
                    if ":" in line:
                        name, value = line.split(":", 1)
                        headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length") or 0)
                body = await reader.readexactly(length) if length else b""
                keep_going = await self._route(method, path, body, reader, writer)
                if not keep_going:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            self._handlers.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _send_json(self, writer, status: int, payload: dict, headers: str = "") -> None:
        data = json.dumps(payload).encode()
        reason = {
            200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            429: "Too Many Requests", 500: "Internal Server Error",
        }.get(status, "Error")
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n{headers}"
            f"Content-Length: {len(data)}\r\n\r\n".encode() + data
        )
        await writer.drain()

    async def _route(self, method, path, body, reader, writer) -> bool:
        path, _, query = path.partition("?")
        if self.dialect == "responses" and is_responses_path(path):
            return await serve_responses(
                self, method, path, query, body, reader, writer,
                lambda b: UpstreamRequest(id=next(_ids), body=b, started_at=time.monotonic()))
        if method == "GET" and path.endswith("/models"):
            self.model_lists += 1
        extra = extra_route(self, method, path, query, body, json.loads)
        if extra is not None:
            await self._send_json(writer, *extra)
            return True
        if method == "GET" and path.endswith("/models"):
            await self._send_json(
                writer, 200, {"object": "list", "data": [{"id": self.model, "object": "model"}]}
            )
            return True
        if method != "POST" or not path.endswith("/chat/completions"):
            await self._send_json(writer, 404, {"error": {"message": f"no route {path}"}})
            return True
        try:
            request_body = json.loads(body or b"{}")
        except ValueError:
            await self._send_json(writer, 400, {"error": {"message": "body is not JSON"}})
            return True
        record = UpstreamRequest(id=next(_ids), body=request_body, started_at=time.monotonic())
        self.requests.append(record)
        if self.fault in FAULT_ERRORS:
            status, error = FAULT_ERRORS[self.fault]
            record.status = status
            record.finished_at = time.monotonic()
            headers = f"Retry-After: {self.retry_after:g}\r\n" if status == 429 else ""
            await self._send_json(writer, status, {"error": error}, headers)
            return True
        if self.fail_status:
            record.status = self.fail_status
            record.finished_at = time.monotonic()
            await self._send_json(
                writer,
                self.fail_status,
                {"error": {"message": self.fail_message, "type": "server_error"}},
            )
            return True
        rejected = dialect_rejection(self.dialect, request_body)
        if rejected is not None:
            record.status = 400
            record.finished_at = time.monotonic()
            await self._send_json(writer, 400, {"error": rejected})
            return True
        if not request_body.get("stream"):
            await self._send_json(writer, 400, {"error": {"message": "only stream=true"}})
            return True
        return await self._stream(record, reader, writer)

    async def _stream(self, record: UpstreamRequest, reader, writer) -> bool:
        body = record.body
        messages = body.get("messages") or []
        text = self.answer(messages) if callable(self.answer) else str(self.answer)
        tokens = self.split(text)
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        finish_reason = "stop"
        if max_tokens and len(tokens) > int(max_tokens):
            tokens, finish_reason = tokens[: int(max_tokens)], "length"
        prompt_tokens = count_prompt_tokens(messages)
        cached = self.cached_tokens if self.cached_tokens is not None else prompt_tokens // 2
        speaker = record.speaker = Speaker(self.dialect, body, prompt_tokens,
                                           min(cached, prompt_tokens))
        include_usage = speaker.include_usage
        model = body.get("model") or self.model
        created = int(time.time())
        chunk_id = record.generation_id = speaker.chunk_id(record.id)
        extra_headers = b""
        if self.dialect == "openrouter":
            self.generations[chunk_id] = (record, speaker, model)
            extra_headers = f"X-Generation-Id: {chunk_id}\r\n".encode()

        def chunk(choices, usage=None, with_usage_key=include_usage):
            payload = {
                "id": chunk_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
            }
            if choices is not NO_CHOICES:
                payload["choices"] = choices
            if with_usage_key:
                payload["usage"] = usage
            return f"data: {json.dumps(payload)}\n\n"

        async def send(event: str):
            if not headers_sent:
                headers_sent.append(True)
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                    b"Cache-Control: no-cache\r\n" + extra_headers
                    + b"Transfer-Encoding: chunked\r\n\r\n"
                )
            data = event.encode()
            writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            await writer.drain()

        headers_sent: list[bool] = []

        # A client that goes away is seen at once: reading the socket returns EOF.
        watcher = asyncio.ensure_future(reader.read(65536))
        streamer = asyncio.ensure_future(
            self._write_tokens(record, tokens, chunk, send, finish_reason, messages, include_usage)
        )
        done, _ = await asyncio.wait({watcher, streamer}, return_when=asyncio.FIRST_COMPLETED)
        if streamer in done and not streamer.cancelled() and streamer.exception() is None:
            watcher.cancel()
            # Let the cancelled read finish before the next request of this keep-alive
            # connection reads the socket (asyncio allows one reader at a time).
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            record.finished_at = time.monotonic()
            if streamer.result() == "dropped":
                writer.transport.abort()
                return False
            if streamer.result() == "closed":  # no terminating chunk: the body is cut
                writer.close()
                return False
            record.completed = True
            with contextlib.suppress(ConnectionError):
                writer.write(b"0\r\n\r\n")
                await writer.drain()
            return True
        # The client closed (EOF or error) or writing failed: stop generating now.
        record.client_closed_at = time.monotonic()
        streamer.cancel()
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await streamer
        return False

    async def _write_tokens(self, record, tokens, chunk, send, finish_reason, messages, usage):
        """Write one response (chat.demo_dialects.write_tokens); a hook, overridden by
        bench.upstream. ``usage``: whether a usage chunk is due."""
        return await write_tokens(self, record, tokens, chunk, send, finish_reason,
                                  record.speaker)
