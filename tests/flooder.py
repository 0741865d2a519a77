"""A client that floods a live server with frames, in a process of its own:
``python -m tests.flooder WS_URL COOKIE SECONDS SOCKETS`` sends ``message`` frames from
SOCKETS sockets as fast as it can write for SECONDS s, each socket reconnecting when
the server closes it, and prints one JSON line: frames sent, ``rate_limited`` frames
received (and whether each came with ``retry_after_ms``), close codes seen, and whether
a ``rate_limited`` frame came before the first 1008 close."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid

import websockets


async def flood_one(url: str, cookie: str, origin: str, until: float, report: dict) -> None:
    frame = json.dumps({"type": "message", "content": "x" * 20})
    while time.monotonic() < until:
        try:
            async with websockets.connect(
                f"{url}/ws/conversations/{uuid.uuid4()}/",
                additional_headers={"Cookie": cookie, "Origin": origin},
                open_timeout=5, close_timeout=1, max_queue=None,
            ) as ws:
                async def read():
                    async for text in ws:
                        data = json.loads(text)
                        if data.get("type") == "error" and data.get("code") == "rate_limited":
                            report["rate_limited"] += 1
                            report["with_retry_after"] += "retry_after_ms" in data
                            if not report["close_codes"]:
                                report["limited_before_close"] = True
                reader = asyncio.ensure_future(read())
                try:
                    while time.monotonic() < until:
                        await ws.send(frame)
                        report["sent"] += 1
                        if report["sent"] % 64 == 0:
                            # send() returns without yielding while the kernel takes
                            # the bytes: let the loop read what the server sent.
                            await asyncio.sleep(0)
                except websockets.ConnectionClosed:
                    pass
                reader.cancel()
                code = ws.close_code
                if code is not None and time.monotonic() < until:
                    report["close_codes"][str(code)] = report["close_codes"].get(str(code), 0) + 1
        except (TimeoutError, OSError, websockets.InvalidHandshake):
            report["failed_connects"] += 1
            await asyncio.sleep(0.05)


async def main(url: str, cookie: str, seconds: float, sockets: int) -> dict:
    origin = url.replace("ws://", "http://", 1)
    report = {"sent": 0, "rate_limited": 0, "with_retry_after": 0, "close_codes": {},
              "limited_before_close": False, "failed_connects": 0}
    until = time.monotonic() + seconds
    await asyncio.gather(*(flood_one(url, cookie, origin, until, report)
                           for _ in range(sockets)))
    return report


if __name__ == "__main__":
    ws_url, cookie_header, duration, count = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    print(json.dumps(asyncio.run(main(ws_url, cookie_header, float(duration), int(count)))))
