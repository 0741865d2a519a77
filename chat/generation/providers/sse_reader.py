"""The client side of server-sent events, as providers stream their answers: the
``data`` of each event from an HTTP response's bytes, and each event's JSON (orjson,
with no SDK object per event: at one object per token the SDK's parsing costs more
CPU than the rest of the run). Providers build their events from these
(.chat_completions)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import orjson


async def data_of(response) -> AsyncIterator[bytes]:
    """The ``data`` of each server-sent event of an httpx response, as bytes (WHATWG
    HTML, "server-sent events": lines end in CRLF, LF or CR; ``data:`` lines of one
    event are joined by LF; a blank line ends the event; comments and other fields are
    skipped). Ends with the body; the stream's ``[DONE]`` is passed on like any data."""
    buffer = b""
    data: list[bytes] = []
    async for raw in response.aiter_bytes():
        buffer = buffer + raw if buffer else raw
        if b"\r" in buffer:
            # A lone CR at the end may be the first half of a CRLF: wait for more.
            keep_cr = buffer.endswith(b"\r")
            buffer = buffer.replace(b"\r\n", b"\n")
            buffer = (buffer[:-1].replace(b"\r", b"\n") + b"\r") if keep_cr \
                else buffer.replace(b"\r", b"\n")
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if not line:
                if data:
                    yield data[0] if len(data) == 1 else b"\n".join(data)
                    data = []
            elif line.startswith(b"data:"):
                data.append(line[6:] if line[5:6] == b" " else line[5:])
    if data:
        yield b"\n".join(data)


def parse(data: bytes):
    """One chunk's JSON. orjson refuses a lone surrogate escape ("\\udcff") that the
    stdlib accepts (and clean_provider_text then replaces): such a chunk, rare, is
    parsed again by the stdlib. Raises json.JSONDecodeError when neither can."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        # Invalid UTF-8 is replaced by U+FFFD, as the SSE standard decodes a stream.
        return json.loads(data.decode("utf-8", "replace"))


async def drain(lines: AsyncIterator[bytes], seconds: float) -> None:
    """Read what follows [DONE] for a moment, so the HTTP/1.1 connection can be reused
    (the SDK does the same); nothing read can change the answer."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(seconds):
            async for _ in lines:
                pass
