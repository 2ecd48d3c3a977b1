"""One side of a run, in a process of its own (started by `python -m bench.peers`, not by hand).

    python -m bench.peers.side consume SYSTEM URL NAME --events N --window 100 --timeout-s T
    python -m bench.peers.side produce SYSTEM URL NAME --events N --mode one|batch|c16

The consumer declares the run's stream / queue / subscription, prints `ready`, consumes until every
event is acked (or the timeout), prints its result as one JSON line, then waits for a line on its
standard input before it removes what it declared: the server's CPU is read in between, so clean-up
is not counted. The producer publishes every event and prints its result as one JSON line. Both
report their own CPU time (the client's cost per event).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Coroutine
from typing import Any

from bench.peers.systems import client
from bench.peers.tally import Tally, new_event, stamp

# mode -> (events per publish call, concurrent publishers)
MODES = {"one": (1, 1), "batch": (100, 1), "c16": (1, 16)}


async def consume(args: argparse.Namespace) -> None:
    system = client(args.system, args.url, args.name, args.window)
    await system.connect()
    try:
        await system.declare()
        tally = Tally(args.events)
        cpu = time.process_time()
        consuming = asyncio.create_task(system.consume(tally))
        finished = asyncio.create_task(tally.done.wait())
        print("ready", flush=True)
        await asyncio.wait({consuming, finished}, timeout=args.timeout_s, return_when=asyncio.FIRST_COMPLETED)
        cpu = time.process_time() - cpu
        finished.cancel()
        if consuming.done():
            consuming.result()  # it failed: raise its error
        # Loops stop on their own once the tally is done; the cancel is for those waiting on an empty
        # queue, bounded because a client may finish a blocking read before it gives in (redis-py does).
        consuming.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(consuming, 30)
        result = {
            "delivered": tally.deliveries,
            "acked": tally.distinct_acked,
            "first_delivery": tally.first_delivery,
            "last_ack": tally.last_ack,
            "p50_ms": tally.latency_ms(0.5),
            "p99_ms": tally.latency_ms(0.99),
            "cpu_s": cpu,
        }
        print(json.dumps(result), flush=True)
        await asyncio.to_thread(sys.stdin.readline)  # the orchestrator has read the server's CPU
        await system.remove()
    finally:
        await system.close()


async def produce(args: argparse.Namespace) -> None:
    system = client(args.system, args.url, args.name, args.window)
    await system.connect()
    try:
        per_call, publishers = MODES[args.mode]
        source = f"bench/{args.name}"
        events = iter([new_event(source, n) for n in range(args.events)])

        async def publisher() -> None:
            # The publishers share one iterator: each takes the next call's events when it is free.
            while chunk := [event for _, event in zip(range(per_call), events, strict=False)]:
                await system.publish(stamp(chunk))

        cpu, first = time.process_time(), time.monotonic()
        async with asyncio.TaskGroup() as group:
            for _ in range(publishers):
                group.create_task(publisher())
        last, cpu = time.monotonic(), time.process_time() - cpu
        print(json.dumps({"published": args.events, "first_publish": first, "last_confirm": last, "cpu_s": cpu}))
    finally:
        await system.close()


def run(main: Coroutine[Any, Any, None]) -> None:
    """uvloop for every client alike, as the router runs under it."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peers.side")
    parser.add_argument("side", choices=["consume", "produce"])
    parser.add_argument("system")
    parser.add_argument("url")
    parser.add_argument("name", help="the run's stream, queue or subscription")
    parser.add_argument("--events", type=int, required=True)
    parser.add_argument("--window", type=int, default=100, help="unacked messages the consumer may hold")
    parser.add_argument("--mode", choices=sorted(MODES), default="one")
    parser.add_argument("--timeout-s", type=float, default=600)
    args = parser.parse_args()
    run(consume(args) if args.side == "consume" else produce(args))


if __name__ == "__main__":
    main()
