"""The router's WAL under sustained load: continuous publishing, receiving + acking, and push delivery.

Runs a router (`python -m router`, default `CATTUBE_WAL_LIMIT_BYTES` unless `--limit-mb`) for
`--minutes`, and prints the WAL's and the database's size every `--every-s` seconds, then checks
that every published event was received from the queue and pushed to the receiver:

    python bench/wal.py --minutes 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
from aiohttp import web
from harness import free_port, serving

BATCH = 20
PUBLISHERS = 2
CONSUMERS = 3
HEADERS = {"content-type": "application/cloudevents-batch+json"}


def mb(path: Path) -> float:
    return path.stat().st_size / 1e6 if path.exists() else 0.0


async def run(url: str, data: Path, seconds: float, every_s: float) -> None:
    published: set[str] = set()
    acked: set[str] = set()
    pushed: set[str] = set()
    pushed_all = asyncio.Event()
    done_publishing = asyncio.Event()

    async def hook(request: web.Request) -> web.Response:
        pushed.add(json.loads(await request.read())["id"])
        if done_publishing.is_set() and pushed >= published:
            pushed_all.set()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    hook_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", hook_port).start()
    async with aiohttp.ClientSession(url) as http:
        sub = {"pattern": {"source": ["load"]}, "target": {"queue": {}}}
        await http.put("/subscriptions/q", json=sub)
        push = {"pattern": {"source": ["load"]}, "target": {"url": f"http://127.0.0.1:{hook_port}/hook"}}
        await http.put("/subscriptions/hook", json=push)
        deadline = time.monotonic() + seconds

        async def publish() -> None:
            while time.monotonic() < deadline:
                ids = [str(uuid.uuid4()) for _ in range(BATCH)]
                events = [
                    {"specversion": "1.0", "id": i, "source": "load", "type": "t", "data": {"pad": "x" * 512}}
                    for i in ids
                ]
                async with http.post("/events", data=json.dumps(events), headers=HEADERS) as response:
                    assert response.status == 202, await response.text()
                published.update(ids)

        async def consume() -> None:
            while not (done_publishing.is_set() and acked >= published):
                body = {"max_messages": 10, "wait_s": 1}
                async with http.post("/subscriptions/q/receive", json=body) as response:
                    messages = (await response.json())["messages"]
                if messages:
                    await http.post("/subscriptions/q/ack", json={"receipts": [m["receipt"] for m in messages]})
                    acked.update(m["event"]["id"] for m in messages)

        async def report() -> None:
            started = time.monotonic()
            while True:
                wal_mb, db_mb = mb(data / "bus.db-wal"), mb(data / "bus.db")
                print(
                    f"{time.monotonic() - started:6.0f} s  published {len(published):8d}  acked {len(acked):8d}"
                    f"  pushed {len(pushed):8d}  WAL {wal_mb:7.1f} MB  db {db_mb:7.1f} MB",
                    flush=True,
                )
                await asyncio.sleep(every_s)

        reporter = asyncio.create_task(report())
        consumers = [asyncio.create_task(consume()) for _ in range(CONSUMERS)]
        await asyncio.gather(*(publish() for _ in range(PUBLISHERS)))
        done_publishing.set()
        await asyncio.gather(*consumers)
        if not pushed >= published:
            await asyncio.wait_for(pushed_all.wait(), 600)
        reporter.cancel()
    await runner.cleanup()
    lost = len(published - acked) + len(published - pushed)
    print(f"end: published {len(published)}, acked {len(acked)}, pushed {len(pushed)}, lost {lost}")
    print(f"WAL at the end {mb(data / 'bus.db-wal'):.1f} MB, database {mb(data / 'bus.db'):.1f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=5)
    parser.add_argument("--every-s", type=float, default=15)
    parser.add_argument("--limit-mb", type=float, help="CATTUBE_WAL_LIMIT_BYTES in MB (default: the router's)")
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        env = {"CATTUBE_DATA_DIR": tmp, "CATTUBE_ROUTER_PORT": str(port), "CATTUBE_LOG_LEVEL": "warning"}
        if args.limit_mb:
            env["CATTUBE_WAL_LIMIT_BYTES"] = str(int(args.limit_mb * 1e6))
        url = f"http://127.0.0.1:{port}"
        with serving([sys.executable, "-m", "router"], url, env):
            asyncio.run(run(url, Path(tmp) / "router", args.minutes * 60, args.every_s))


if __name__ == "__main__":
    main()
