"""The loopback upstream's fault knob (chat.demo_model.UpstreamServer.fault): what real
providers and proxies were seen to send, for tests/test_upstream_faults.py."""

from __future__ import annotations

import asyncio
import json

# Faults UpstreamServer can produce (its ``fault`` knob); "mid-stream" ones happen after
# ``fault_after`` content chunks.
FAULTS = (
    "unauthorized",         # HTTP 401 with an OpenAI-style error body
    "rate_limited",         # HTTP 429 with Retry-After: ``retry_after`` seconds
    "server_error",         # HTTP 500
    "hang_before_headers",  # reads the request, then sends nothing until the client leaves
    "drop_mid_stream",      # aborts the TCP connection mid-stream
    "stall_mid_stream",     # sends nothing more mid-stream until the client leaves
    "end_mid_stream",       # ends the body cleanly mid-stream: no finish_reason, no [DONE]
    "malformed_json",       # a mid-stream event whose data is not JSON
    "no_choices",           # a mid-stream chunk without "choices"; "choices": null on usage
    "error_event",          # a mid-stream {"error": {...}} event, then the end of the body
    "no_done_close",        # finish_reason and usage, then closes without [DONE] or body end
    "no_done_hang",         # finish_reason and usage, then sends nothing until the client leaves
    "nul",                  # a mid-stream delta containing NUL (JSON "\u0000")
    "lone_surrogate",       # a mid-stream delta containing a lone surrogate (JSON "\udcff")
)
# The extra delta the "nul" and "lone_surrogate" faults send.
POISON = {"nul": " nul\x00here", "lone_surrogate": " lone\udcffhere"}
# The body of the HTTP error faults: (status, OpenAI-style error).
FAULT_ERRORS = {
    "unauthorized": (401, {"message": "Incorrect API key provided.",
                           "type": "invalid_request_error", "code": "invalid_api_key"}),
    "rate_limited": (429, {"message": "Rate limit reached for requests.",
                           "type": "requests", "code": "rate_limit_exceeded"}),
    "server_error": (500, {"message": "The server had an error while processing your request.",
                           "type": "server_error", "code": None}),
}
ERROR_EVENT = {"message": "The model is overloaded; the stream was interrupted.",
               "type": "server_error", "code": "overloaded"}


# A chunk() argument: leave the "choices" key out of the chunk.
NO_CHOICES = object()


async def mid_stream_fault(fault: str, record, chunk, send) -> str | None:
    """Send what ``fault`` sends in the middle of a stream; returns how the response
    ends (``"dropped"``, ``"done"``) or None to go on streaming."""
    if fault == "drop_mid_stream":
        return "dropped"
    if fault == "stall_mid_stream":
        await asyncio.Event().wait()
    if fault == "end_mid_stream":
        return "done"
    if fault == "malformed_json":
        await send('data: {"id": "chatcmpl-broken", "choices": [{"delta": {"content\n\n')
    elif fault == "no_choices":
        await send(chunk(NO_CHOICES))
    elif fault == "error_event":
        await send(f"data: {json.dumps({'error': ERROR_EVENT})}\n\n")
        return "done"
    elif fault in POISON:
        poison = POISON[fault]
        await send(chunk([{"index": 0, "delta": {"content": poison}, "finish_reason": None}]))
        record.chunks_written += 1
        record.text_written.append(poison)
    return None


