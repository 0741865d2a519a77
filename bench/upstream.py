"""The bench's loopback upstream: ``chat.demo_model.UpstreamServer`` whose tokens carry
their index and the wall-clock time they were written (``" 17@1732170000.123456"``), so
clients can count lost, duplicated and out-of-order tokens and measure latency; and a
``GET /stats`` route that reports every request (times are ``time.monotonic()``, which
is one clock for every process of the machine).

A request whose last user message (its *tag*) contains ``tokens=N`` is answered with N
tokens instead of ``--tokens``. ``GET /stats/P`` reports only the requests whose
tag starts with P. For a request the client closed, ``recent_chunk_times`` holds the
write times of its last chunks (to count chunks written after a stop).

Run: ``python -m bench.upstream --port P --tokens-per-second 20 --tokens 200``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import time
import urllib.parse

from chat.demo_model import UpstreamServer

TOKENS_RE = re.compile(r"\btokens=(\d+)")
# Write times kept per request: enough to count the chunks written after a stop.
RECENT_CHUNKS = 64


def tag_of(messages: list[dict]) -> str:
    """The last user message: the bench puts the stream's id there."""
    for message in reversed(messages or []):
        if message.get("role") == "user":
            return str(message.get("content") or "")
    return ""


class BenchUpstream(UpstreamServer):
    """UpstreamServer answering ``tokens`` timestamped tokens, with ``GET /stats``."""

    def __init__(self, *, tokens: int, **kwargs):
        self.default_tokens = tokens
        # request id -> write times (monotonic) of its last RECENT_CHUNKS chunks
        self.chunk_times: dict[int, collections.deque] = {}
        super().__init__(answer=self._answer, **kwargs)

    def _answer(self, messages: list[dict]) -> str:
        found = TOKENS_RE.search(tag_of(messages))
        # The answer's text does not matter: _write_tokens writes stamped tokens.
        return " ".join(["x"] * (int(found.group(1)) if found else self.default_tokens))

    async def _route(self, method, path, body, reader, writer) -> bool:
        if method == "GET" and (path == "/stats" or path.startswith("/stats/")):
            prefix = urllib.parse.unquote(path[len("/stats/"):]) if path != "/stats" else ""
            await self._send_json(writer, 200, self.stats(prefix))
            return True
        return await super()._route(method, path, body, reader, writer)

    def stats(self, prefix: str = "") -> dict:
        """``{"open_streams", "requests": [{"tag", "started_at", "client_closed_at",
        "finished_at", "chunks_written", "completed", "open", "recent_chunk_times"}]}``
        for the requests whose tag starts with ``prefix`` (times: monotonic s)."""
        requests = []
        for r in self.requests:
            tag = tag_of(r.body.get("messages"))
            if not tag.startswith(prefix):
                continue
            closed = r.client_closed_at is not None
            requests.append({
                "tag": tag,
                "started_at": r.started_at,
                "client_closed_at": r.client_closed_at,
                "finished_at": r.finished_at,
                "chunks_written": r.chunks_written,
                "completed": r.completed,
                "open": r.open,
                "recent_chunk_times": list(self.chunk_times.get(r.id, ())) if closed else [],
            })
        return {
            "open_streams": sum(1 for r in requests if r["open"]),
            "requests": requests,
        }

    async def _write_tokens(self, record, tokens, chunk, send, finish_reason, messages, usage):
        delay = 1.0 / self.tokens_per_second if self.tokens_per_second > 0 else 0
        await send(chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                           "finish_reason": None}]))
        # Each content chunk is the same JSON but for the token: format it once, so the
        # upstream spends little CPU per token (it shares the machine with the worker).
        # Tokens are digits, "@" and "." only: nothing to escape.
        head, tail = chunk(
            [{"index": 0, "delta": {"content": "\x00"}, "finish_reason": None}]
        ).split("\\u0000")
        times = self.chunk_times[record.id] = collections.deque(maxlen=RECENT_CHUNKS)
        started = time.monotonic()
        for index in range(len(tokens)):
            # Paced against the start, not token to token, so a busy loop does not
            # slow the stream down for good.
            wait = started + (index + 1) * delay - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            await send(f"{head} {index}@{time.time():.6f}{tail}")
            record.chunks_written += 1
            now = time.monotonic()
            times.append(now)
            if record.first_chunk_at is None:
                record.first_chunk_at = now
        # Every token written: no stop to count chunks after, so free the times.
        self.chunk_times.pop(record.id, None)
        await send(chunk([{"index": 0, "delta": {}, "finish_reason": finish_reason}]))
        if usage:
            await send(chunk([], {
                "prompt_tokens": 10,
                "completion_tokens": len(tokens),
                "total_tokens": 10 + len(tokens),
            }))
        await send("data: [DONE]\n\n")
        return "done"


async def main(port: int, tokens_per_second: float, tokens: int) -> None:
    server = BenchUpstream(port=port, tokens=tokens, tokens_per_second=tokens_per_second)
    await server.start()
    print(f"upstream on {server.base_url}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens-per-second", type=float, default=20)
    parser.add_argument("--tokens", type=int, default=200)
    args = parser.parse_args()
    try:
        asyncio.run(main(args.port, args.tokens_per_second, args.tokens))
    except KeyboardInterrupt:
        pass
