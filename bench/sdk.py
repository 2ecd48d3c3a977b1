"""The SDK's client cost: CPU per request of `RouterClient` against raw aiohttp, in one script.

    .venv/bin/python bench/sdk.py [--requests 3000] [--rounds 2]

Starts the bare endpoint (`bench/bare.py`: reads the body, answers 202 with one publish result), then
runs each client in a process of its own, one after the other and round after round (so a noisy
moment hits all of them): `aiohttp` (a `ClientSession`, the body encoded by hand, as
`bench/peers/cattube_clients.py` does), `sdk` (`RouterClient.publish`, its default transport) and
`sdk-httpx` (`RouterClient.publish` over httpx's own transport), each one at a time and with 16
concurrent publishers on one client. A client's CPU per request is its own process's CPU time
(`time.process_time`) over the requests it made, start-up left out; the server's is not in it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

CLIENTS = ("aiohttp", "sdk", "sdk-httpx")


def event(n: int) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": f"sdk-{n}",
        "source": "bench",
        "type": "bench.event",
        "datacontenttype": "application/json",
        "data": {"payload": "x" * 900, "n": n},
    }


async def run_client(kind: str, url: str, requests: int, concurrency: int) -> dict[str, float]:
    import aiohttp

    from router.client import RouterClient

    counter = iter(range(10**9))
    publish: Any
    if kind == "aiohttp":
        session = aiohttp.ClientSession()
        headers = {"Content-Type": "application/cloudevents+json"}

        async def publish_raw(body: dict[str, Any]) -> None:
            async with session.post(url + "/events", data=json.dumps(body), headers=headers) as response:
                await response.json()
                if response.status != 202:
                    raise RuntimeError(f"{response.status}")

        publish, close = publish_raw, session.close
    else:
        import httpx

        # The default transport, or httpx's own: what `transport=` keeps for a caller who wants it.
        client = RouterClient(url, transport=httpx.AsyncHTTPTransport() if kind == "sdk-httpx" else None)
        publish, close = client.publish, client.aclose

    async def worker(count: int) -> None:
        for _ in range(count):
            await publish(event(next(counter)))

    await worker(20)  # connections open, imports done
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(requests // concurrency) for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await close()
    done = requests // concurrency * concurrency
    return {"cpu_us_per_request": round(cpu / done * 1e6, 1), "requests_per_s": round(done / wall)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--client", help=argparse.SUPPRESS)  # internal: run one client in this process
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        import uvloop

        result = uvloop.run(run_client(args.client, args.url, args.requests, args.concurrency))
        print(json.dumps(result))
        return

    from harness import free_port, serving

    port = free_port()
    runs: dict[str, list[dict[str, float]]] = {}
    load_before = os.getloadavg()
    with serving([sys.executable, str(HERE / "bare.py"), str(port)], f"http://127.0.0.1:{port}") as bare:
        for _ in range(args.rounds):
            for concurrency in (1, 16):
                for kind in CLIENTS:
                    argv = [sys.executable, __file__, "--client", kind, "--url", bare.url]
                    argv += ["--requests", str(args.requests), "--concurrency", str(concurrency)]
                    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
                    runs.setdefault(f"{kind}, c{concurrency}", []).append(json.loads(out))
    summary: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }
    for name, results in runs.items():
        best = min(r["cpu_us_per_request"] for r in results)
        summary[name] = {"cpu_us_per_request": [r["cpu_us_per_request"] for r in results], "best": best}
        summary[name]["requests_per_s"] = [r["requests_per_s"] for r in results]
    for concurrency in (1, 16):
        raw = summary[f"aiohttp, c{concurrency}"]["best"]
        for kind in CLIENTS[1:]:
            summary[f"{kind} / aiohttp, c{concurrency}"] = round(summary[f"{kind}, c{concurrency}"]["best"] / raw, 2)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
