"""The HTTP side of the loopback's ``responses`` dialect (chat.demo_responses): the
Responses API endpoints, and each connection that streams a response's events.

Endpoints (OpenAI API reference, "Responses": create, retrieve, cancel, and
"Streaming events"; the guide "Background mode"):

- ``POST /v1/responses``: ``{"model", "input", "instructions"?, "max_output_tokens"?,
  "stream"?, "background"?, "store"? (default true), "reasoning"?}``. ``stream: true``
  answers typed server-sent events (``event: <type>`` and ``data: {"type",
  "sequence_number", ...}``, no ``[DONE]``); otherwise the response object (for
  ``background: true`` at once, status ``queued``). ``background`` with ``store:
  false`` is HTTP 400.
- ``GET /v1/responses/{id}``: the response object (404 unless stored);
  ``?stream=true&starting_after=N`` (background responses only) replays the events
  whose ``sequence_number`` is greater than N, then follows the live ones.
- ``POST /v1/responses/{id}/cancel``: background responses only (400 otherwise);
  stops generating and answers the response, status ``cancelled``, with the usage of
  what was generated. Cancelling a finished response answers it unchanged (as
  Responses-compatible gateways document; a provider should also tolerate an error).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid

from .accounting import count_prompt_tokens
from .demo_faults import FAULT_ERRORS
from .demo_responses import Follow, ResponseRun, generate, input_messages


def _error(message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error",
                      "param": param, "code": code}}


def is_responses_path(path: str) -> bool:
    """True for ``/v1/responses`` and the paths below it."""
    return path.rstrip("/").endswith("/responses") or "/responses/" in path


# -- HTTP ------------------------------------------------------------------------------
async def _send_json(writer, status: int, payload: dict, headers: str = "") -> None:
    data = json.dumps(payload).encode()
    reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
              405: "Method Not Allowed", 429: "Too Many Requests",
              500: "Internal Server Error"}.get(status, "Error")
    writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                 f"{headers}Content-Length: {len(data)}\r\n\r\n".encode() + data)
    await writer.drain()


async def _write_chunk(writer, text: str) -> None:
    data = text.encode()
    writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
    await writer.drain()


async def serve(server, method: str, path: str, query: str, body: bytes,
                reader, writer, new_record) -> bool:
    """Answer one request under ``/v1/responses``; returns whether the connection stays
    open for the next request (keep-alive). ``new_record(body)`` makes the
    chat.demo_model.UpstreamRequest of a create request."""
    state = server.responses
    tail = path.split("/responses", 1)[1].strip("/")
    parts = tail.split("/") if tail else []
    name = "/responses" + ("/{id}" if parts else "") + "".join(f"/{p}" for p in parts[1:])
    state.calls[f"{method} {name}"] += 1
    params = dict(p.partition("=")[::2] for p in query.split("&") if p)
    if method == "POST" and not parts:
        return await _create(server, body, reader, writer, new_record)
    if method == "GET" and len(parts) == 1:
        return await _retrieve(server, parts[0], params, reader, writer)
    if method == "POST" and len(parts) == 2 and parts[1] == "cancel":
        return await _cancel(server, parts[0], writer)
    await _send_json(writer, 404, _error(f"no route {method} {path}"))
    return True


async def _create(server, body: bytes, reader, writer, new_record) -> bool:
    try:
        request = json.loads(body or b"{}")
    except ValueError:
        await _send_json(writer, 400, _error("The body is not valid JSON."))
        return True
    if not isinstance(request, dict):
        await _send_json(writer, 400, _error("The body must be a JSON object."))
        return True
    record = new_record(request)
    server.requests.append(record)
    rejected = _rejection(server, request)
    if rejected is not None:
        status, payload, headers = rejected
        record.status = status
        record.finished_at = time.monotonic()
        await _send_json(writer, status, payload, headers)
        return True
    messages = input_messages(request)
    prompt_tokens = count_prompt_tokens(messages)
    cached = server.cached_tokens if server.cached_tokens is not None else prompt_tokens // 2
    background = request.get("background") is True
    run = ResponseRun(
        id=f"resp_{uuid.uuid4().hex}", body=request, record=record, messages=messages,
        model=str(request["model"]), background=background,
        store=request.get("store", True) is not False, prompt_tokens=prompt_tokens,
        cached_tokens=min(cached, prompt_tokens),
        status="queued" if background else "in_progress",
    )
    record.generation_id = run.id
    server.responses.runs[run.id] = run
    run.task = asyncio.ensure_future(generate(server, run))
    if request.get("stream") is True:
        return await _follow(server, run, reader, writer, starting_after=-1, origin="post")
    if background:
        await _send_json(writer, 200, run.snapshot())
        return True
    # Foreground without streaming: answer when done, stop if the client leaves first.
    watcher = asyncio.ensure_future(reader.read(65536))
    await asyncio.wait({run.task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if not run.finished:
        record.client_closed_at = time.monotonic()
        run.end("cancelled")
        return False
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    await _send_json(writer, 200, run.snapshot())
    return True


def _rejection(server, request: dict) -> tuple[int, dict, str] | None:
    """(status, body, extra headers) of an HTTP error for this create request, or None."""
    if server.fault in FAULT_ERRORS:
        status, error = FAULT_ERRORS[server.fault]
        headers = f"Retry-After: {server.retry_after:g}\r\n" if status == 429 else ""
        return status, {"error": error}, headers
    if server.fail_status:
        return server.fail_status, {"error": {"message": server.fail_message,
                                              "type": "server_error"}}, ""
    if not isinstance(request.get("model"), str) or not request["model"]:
        return 400, _error("Missing required parameter: 'model'.", "model",
                           "missing_required_parameter"), ""
    if input_messages(request) is None:
        return 400, _error("Invalid type for 'input': expected a string or an array of "
                           "input items.", "input", "invalid_type"), ""
    limit = request.get("max_output_tokens")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)
                              or limit < 1):
        return 400, _error("Invalid 'max_output_tokens': expected a positive integer.",
                           "max_output_tokens", "invalid_value"), ""
    if request.get("background") is True and request.get("store", True) is False:
        return 400, _error("Background mode requires 'store' to be true.", "store",
                           "invalid_value"), ""
    return None


async def _retrieve(server, response_id: str, params: dict, reader, writer) -> bool:
    run = server.responses.runs.get(response_id)
    if run is None or not run.store:
        await _send_json(writer, 404, _error(f"Response with id '{response_id}' not found.",
                                             "response_id"))
        return True
    if params.get("stream") != "true":
        await _send_json(writer, 200, run.snapshot())
        return True
    if not run.background:
        await _send_json(writer, 400, _error(
            "Streaming a response again is only possible for background responses.",
            "stream"))
        return True
    after = params.get("starting_after", "-1")
    try:
        starting_after = int(after)
    except ValueError:
        await _send_json(writer, 400, _error(
            f"Invalid 'starting_after': {after!r} is not an integer.", "starting_after"))
        return True
    return await _follow(server, run, reader, writer, starting_after=starting_after,
                         origin="get")


async def _cancel(server, response_id: str, writer) -> bool:
    run = server.responses.runs.get(response_id)
    if run is None or not run.store:
        await _send_json(writer, 404, _error(f"Response with id '{response_id}' not found.",
                                             "response_id"))
        return True
    if not run.background:
        await _send_json(writer, 400, _error(
            "Only responses created with background=true can be cancelled.", "response_id"))
        return True
    run.end("cancelled")  # no-op on a finished response: it is answered unchanged
    await _send_json(writer, 200, run.snapshot())
    return True


# -- streaming ---------------------------------------------------------------------------
async def _follow(server, run: ResponseRun, reader, writer, *, starting_after: int,
                  origin: str) -> bool:
    """Stream ``run``'s events after ``starting_after`` and the live ones until it ends;
    a client that closes the connection is seen at once (the socket reads EOF)."""
    follow = Follow(origin, starting_after, time.monotonic())
    run.follows.append(follow)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                 b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n")
    watcher = asyncio.ensure_future(reader.read(65536))
    pump = asyncio.ensure_future(_pump(server, run, writer, follow))
    done, _ = await asyncio.wait({watcher, pump}, return_when=asyncio.FIRST_COMPLETED)
    if pump in done and not pump.cancelled() and pump.exception() is None:
        watcher.cancel()
        # The cancelled read must finish before the next request of this keep-alive
        # connection reads the socket (asyncio allows one reader at a time).
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        if pump.result() == "dropped":
            follow.dropped = True
            writer.transport.abort()
            if not run.background:
                run.end("cancelled")
            return False
        with contextlib.suppress(ConnectionError):
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        return True
    # The client closed (EOF or error) or writing failed.
    follow.closed_at = time.monotonic()
    if origin == "post":
        run.record.client_closed_at = follow.closed_at
    pump.cancel()
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await pump
    if not run.background:  # foreground: the closed connection stops generation
        run.end("cancelled")
    return False


async def _pump(server, run: ResponseRun, writer, follow: Follow) -> str:
    """Write events to one connection until the response ends (``"done"``) or a fault
    cuts it (``"dropped"``). Stream faults apply to the creating connection only."""
    state = server.responses
    faulty = follow.origin == "post"
    index = max(follow.starting_after + 1, 0)
    deltas = 0
    while True:
        while index < len(run.events):
            kind, text = run.events[index]
            if kind == "response.output_text.delta" and faulty:
                if ((state.fault == "drop_mid_stream" and deltas == server.fault_after)
                        or (server.drop_after is not None and deltas >= server.drop_after)):
                    return "dropped"
                if state.fault == "malformed_event" and deltas == server.fault_after:
                    await _write_chunk(writer, f"event: {kind}\ndata: "
                                       '{"type": "response.output_text.delta", "delta": "bro'
                                       "\n\n")
            await _write_chunk(writer, text)
            follow.sequence_numbers.append(index)
            index += 1
            if kind == "response.output_text.delta":
                deltas += 1
                if faulty:
                    run.record.chunks_written += 1
                    if run.record.first_chunk_at is None:
                        run.record.first_chunk_at = time.monotonic()
        if run.finished:
            return "done"
        await run.wake.wait()
