"""Load generator for the router benchmarks, run in its own process (aiohttp: cheap per request).

    python bench/loadgen.py publish URL --concurrency 16 --duration 10 [--batch 100] [--token T]
    python bench/loadgen.py consume URL --subscription q --concurrency 4 --count 20000 [--token T]
    python bench/loadgen.py paced URL --rate 1000 --duration 10   # single publishes at a fixed rate

Prints one JSON line with what it measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid

import aiohttp


def event(prefix: str, n: int) -> dict[str, object]:
    return {
        "specversion": "1.0",
        "id": f"{prefix}-{n}",
        "source": "bench",
        "type": "bench.event",
        "datacontenttype": "application/json",
        "data": {"payload": "x" * 900, "n": n},  # about 1 KiB per event, as the peers were measured
    }


async def publish(args: argparse.Namespace) -> dict[str, float]:
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    if args.batch > 1:
        headers["Content-Type"] = "application/cloudevents-batch+json"
    else:
        headers["Content-Type"] = "application/cloudevents+json"
    prefix = uuid.uuid4().hex
    counter = iter(range(10**12))
    latencies: list[float] = []
    done_events = 0
    deadline = time.perf_counter() + args.duration

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal done_events
        while time.perf_counter() < deadline:
            if args.batch > 1:
                body = json.dumps([event(prefix, next(counter)) for _ in range(args.batch)])
            else:
                body = json.dumps(event(prefix, next(counter)))
            started = time.perf_counter()
            async with session.post(args.url, data=body, headers=headers) as response:
                await response.read()
                if response.status != 202:
                    raise RuntimeError(f"{response.status}: {await response.text()}")
            latencies.append(time.perf_counter() - started)
            done_events += args.batch

    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "elapsed_s": elapsed,
        "requests_per_s": len(latencies) / elapsed,
        "events_per_s": done_events / elapsed,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
    }


async def paced(args: argparse.Namespace) -> dict[str, float]:
    """Publish one event per request at `rate` per second, each stamped with when it was sent."""
    headers = {"Content-Type": "application/cloudevents+json"}
    if args.token:
        headers["Authorization"] = f"Bearer {args.token}"
    prefix = uuid.uuid4().hex
    total = int(args.rate * args.duration)
    loop = asyncio.get_running_loop()

    async def send(session: aiohttp.ClientSession, n: int) -> None:
        event = {**event_of(prefix, n), "data": {"sent": time.monotonic(), "n": n}}
        async with session.post(args.url, data=json.dumps(event), headers=headers) as response:
            await response.read()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:
        started = loop.time()
        tasks = []
        for n in range(total):
            delay = started + n / args.rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing the load, not waiting for a condition
            tasks.append(asyncio.create_task(send(session, n)))
        await asyncio.gather(*tasks)
    return {"sent": total, "rate": args.rate}


def event_of(prefix: str, n: int) -> dict[str, object]:
    return {"specversion": "1.0", "id": f"{prefix}-{n}", "source": "bench", "type": "bench.paced"}


async def consume(args: argparse.Namespace) -> dict[str, float]:
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    base = f"{args.url}/subscriptions/{args.subscription}"
    received = 0
    requests = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal received, requests
        while received < args.count:
            body = {"max_messages": 10, "wait_s": 1, "visibility_timeout_s": 60}
            async with session.post(f"{base}/receive", json=body, headers=headers) as response:
                messages = (await response.json())["messages"]
            requests += 1
            if not messages:
                return
            received += len(messages)
            receipts = [m["receipt"] for m in messages]
            async with session.post(f"{base}/ack", json={"receipts": receipts}, headers=headers) as response:
                await response.read()
            requests += 1

    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - started
    return {"messages_per_s": received / elapsed, "received": received, "requests": requests}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["publish", "consume", "paced"])
    parser.add_argument("url")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--subscription", default="bench")
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--token")
    parser.add_argument("--rate", type=float, default=1000)
    args = parser.parse_args()
    modes = {"publish": publish, "consume": consume, "paced": paced}
    result = asyncio.run(modes[args.mode](args))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
