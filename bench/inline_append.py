"""How long an inline append blocks the router's event loop, against a hop to the store's thread.

The SQLite store commits small appends inline on the loop (router/stores/sqlite/core.py, INLINE_APPEND_*):
the loop runs nothing else meanwhile. This opens a store in a temporary directory with one queue
subscription (each event is a row in `events` and one in `messages`), then appends `--rounds` times each
size one way and the other, alternating, and prints per append: how long the loop was blocked (inline:
the transaction itself; hop: the loop is free meanwhile), the wall time to the answer, and the process's CPU
(every thread), as medians and 99th percentiles. Durability is `batched` unless `--durability fsync`:

    python -m bench.inline_append --sizes 1,10,100 --rounds 300
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

import orjson

from router.cloudevents import Encoded
from router.fanout import Fanout
from router.notifier import InProcessNotifier
from router.persistence import Delivery, SubscriptionSpec
from router.settings import Durability
from router.stores.sqlite import SQLiteEventStore


def events(count: int, body_bytes: int) -> list[Encoded]:
    out = []
    for _ in range(count):
        event = {"specversion": "1.0", "id": uuid.uuid4().hex, "source": "bench", "type": "bench.inline"}
        event["data"] = "x" * max(0, body_bytes - len(orjson.dumps(event)) - 10)
        out.append(Encoded(event, orjson.dumps(event)))
    return out


def quantiles(values: list[float]) -> str:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"{statistics.median(ordered) * 1e6:7.0f} / {p99 * 1e6:7.0f}"


async def measure(
    store: SQLiteEventStore, size: int, rounds: int, body_bytes: int
) -> dict[str, dict[str, list[float]]]:
    results: dict[str, dict[str, list[float]]] = {
        way: {"blocked": [], "wall": [], "cpu": []} for way in ("inline", "hop")
    }
    blocked: list[float] = []
    call_locked = store._call_locked

    def timed(fn, args):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        try:
            return call_locked(fn, args)
        finally:
            if threading.current_thread() is threading.main_thread():  # inline: the loop ran nothing else meanwhile
                blocked.append(time.perf_counter() - started)

    store._call_locked = timed  # type: ignore[method-assign]
    for n in range(rounds * 2):
        way = "inline" if n % 2 == 0 else "hop"
        batch = events(size, body_bytes)
        now_ms = int(time.time() * 1000)
        cpu, wall = time.process_time(), time.perf_counter()
        await store._run(store._append, batch, now_ms, inline=way == "inline")
        results[way]["wall"].append(time.perf_counter() - wall)
        results[way]["cpu"].append(time.process_time() - cpu)
        if way == "inline" and blocked:  # none when the connection was busy (a WAL truncation): it hopped instead
            results[way]["blocked"].append(blocked.pop())
    del store._call_locked
    return results


async def main(sizes: list[int], rounds: int, body_bytes: int, durability: Durability) -> None:
    with tempfile.TemporaryDirectory(prefix="cattube-inline-") as tmp:
        store = SQLiteEventStore(Path(tmp) / "bus.db", durability=durability)
        await store.open(InProcessNotifier(), Fanout())
        try:
            await store.put_subscription(
                SubscriptionSpec("q", None, None, {"queue": {}}, Delivery()), int(time.time() * 1000)
            )
            await measure(store, 10, 20, body_bytes)  # warm the statement cache and the page cache
            print(f"durability {durability}, {body_bytes} B per event, {rounds} appends each way, alternating")
            print("| events | inline: loop blocked, µs (median / p99) | inline: CPU | hop: CPU | hop: wall |")
            print("| ---: | ---: | ---: | ---: | ---: |")
            for size in sizes:
                r = await measure(store, size, rounds, body_bytes)
                print(
                    f"| {size} | {quantiles(r['inline']['blocked'])} | {quantiles(r['inline']['cpu'])}"
                    f" | {quantiles(r['hop']['cpu'])} | {quantiles(r['hop']['wall'])} |"
                )
        finally:
            await store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,10,100", help="events per append, comma-separated")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--body-bytes", type=int, default=1024)
    parser.add_argument("--durability", choices=["batched", "fsync"], default="batched")
    args = parser.parse_args()
    asyncio.run(main([int(s) for s in args.sizes.split(",")], args.rounds, args.body_bytes, args.durability))
