"""A push consumer for the benchmarks: counts deliveries and measures publish → receipt latency.

    python bench/receiver.py PORT COUNT

Answers 204 to every POST. Events whose data carries `sent` (a `time.monotonic()` reading taken by
the publisher just before its request; the clock is shared by every process on the machine) give
a latency sample. After COUNT deliveries it prints one JSON line and exits.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from aiohttp import web


async def main() -> None:
    port, count = int(sys.argv[1]), int(sys.argv[2])
    latencies: list[float] = []
    times: list[float] = []
    finished = asyncio.Event()

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        now = time.monotonic()
        times.append(now)
        sent = json.loads(body).get("data", {}).get("sent")
        if sent is not None:
            latencies.append(now - sent)
        if len(times) == count:
            latencies.sort()
            result = {
                "received": len(times),
                "events_per_s": (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0,
                "p50_ms": latencies[len(latencies) // 2] * 1000 if latencies else None,
                "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000 if latencies else None,
            }
            print(json.dumps(result), flush=True)
            finished.set()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await finished.wait()
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
