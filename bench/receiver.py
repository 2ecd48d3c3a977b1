"""A push consumer for the benchmarks: counts deliveries and measures publish → receipt latency.

    python bench/receiver.py PORT COUNT

A bare ASGI app under uvicorn (httptools), as cheap a consumer as Python serves, so that on this
2-core machine the router rather than its consumer is what is measured. It answers 204 to every
POST. Events whose data carries `sent` (a `time.monotonic()` reading taken by the publisher just
before its request; the clock is shared by every process on the machine) give a latency sample.
After COUNT deliveries it prints one JSON line and exits.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import uvicorn


def main() -> None:
    port, count = int(sys.argv[1]), int(sys.argv[2])
    latencies: list[float] = []
    times: list[float] = []
    server: uvicorn.Server | None = None

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        now = time.monotonic()
        times.append(now)
        if b'"sent"' in body:
            latencies.append(now - json.loads(body)["data"]["sent"])
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        if len(times) == count:
            latencies.sort()
            result = {
                "received": len(times),
                "events_per_s": (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0,
                "p50_ms": latencies[len(latencies) // 2] * 1000 if latencies else None,
                "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000 if latencies else None,
            }
            print(json.dumps(result), flush=True)
            assert server is not None
            server.should_exit = True

    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    server.run()


if __name__ == "__main__":
    main()
