"""The bench's loopback upstream: ``chat.demo_model.UpstreamServer`` whose tokens carry
their index and the wall-clock time they were written (``" 17@1732170000.123456"``), so
clients can count lost, duplicated and out-of-order tokens and measure latency; and a
``GET /stats`` route that reports every request (times are ``time.monotonic()``, which
is one clock for every process of the machine).

Run: ``python -m bench.upstream --port P --tokens-per-second 20 --tokens 200``.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from chat.demo_model import UpstreamServer


def tag_of(messages: list[dict]) -> str:
    """The last user message: the bench puts the stream's id there."""
    for message in reversed(messages or []):
        if message.get("role") == "user":
            return str(message.get("content") or "")
    return ""


class BenchUpstream(UpstreamServer):
    """UpstreamServer answering ``tokens`` timestamped tokens, with ``GET /stats``."""

    def __init__(self, *, tokens: int, **kwargs):
        super().__init__(answer=" ".join(["x"] * tokens), **kwargs)

    async def _route(self, method, path, body, reader, writer) -> bool:
        if method == "GET" and path == "/stats":
            await self._send_json(writer, 200, self.stats())
            return True
        return await super()._route(method, path, body, reader, writer)

    def stats(self) -> dict:
        return {
            "open_streams": self.open_streams,
            "requests": [
                {
                    "tag": tag_of(r.body.get("messages")),
                    "started_at": r.started_at,
                    "client_closed_at": r.client_closed_at,
                    "finished_at": r.finished_at,
                    "chunks_written": r.chunks_written,
                    "completed": r.completed,
                    "open": r.open,
                }
                for r in self.requests
            ],
        }

    async def _write_tokens(self, record, tokens, chunk, send, finish_reason, messages, usage):
        delay = 1.0 / self.tokens_per_second if self.tokens_per_second > 0 else 0
        await send(chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                           "finish_reason": None}]))
        started = time.monotonic()
        for index in range(len(tokens)):
            # Paced against the start, not token to token, so a busy loop does not
            # slow the stream down for good.
            wait = started + (index + 1) * delay - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            token = f" {index}@{time.time():.6f}"
            await send(chunk([{"index": 0, "delta": {"content": token}, "finish_reason": None}]))
            record.chunks_written += 1
            if record.first_chunk_at is None:
                record.first_chunk_at = time.monotonic()
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
