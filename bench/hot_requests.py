"""Requests per CPU-second of the router's hot routes through uvicorn: POST /events and POST .../ack, bare.

    .venv/bin/python bench/hot_requests.py [--requests 6000] [--rounds 3] [--repo PATH] [--env KEY=VALUE]

Starts `python -m router` (SQLite, `batched`, so no fsync stretches the rounds) from `--repo` (default: this
checkout; give another checkout to compare two versions on one machine), then, from this process (aiohttp,
16 requests in flight on 16 connections): publishes `--requests` single events, receives them all (100 per
receive, not measured) and acks them one receipt per request. For each of the two phases it reads the
router's CPU time from /proc: CPU per request and its inverse, requests per CPU-second, which the load of
a shared machine moves far less than requests per second. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import cpu_s, free_port

CONCURRENCY = 16


def event(prefix: str, n: int) -> bytes:
    body = {"specversion": "1.0", "id": f"{prefix}-{n}", "source": "bench", "type": "bench.event"}
    return json.dumps({**body, "datacontenttype": "application/json", "data": {"payload": "x" * 900, "n": n}}).encode()


async def drive(session: aiohttp.ClientSession, url: str, bodies: list[bytes], content_type: str, ok: int) -> float:
    """Send every body, CONCURRENCY at a time; the wall seconds it took."""
    pending = list(reversed(bodies))
    headers = {"Content-Type": content_type}

    async def worker() -> None:
        while pending:
            async with session.post(url, data=pending.pop(), headers=headers) as response:
                answer = await response.read()
                if response.status != ok:
                    raise RuntimeError(f"{url}: {response.status} {answer[:300]!r}")

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return time.perf_counter() - started


async def one_round(url: str, pid: int, count: int) -> dict[str, float]:
    result: dict[str, float] = {}
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:
        name = uuid.uuid4().hex[:12]
        spec = {"pattern": {"source": ["bench"]}, "target": {"queue": {}}}
        async with session.put(f"{url}/subscriptions/{name}", json=spec) as response:
            assert response.status == 201, await response.text()
        prefix = uuid.uuid4().hex
        for phase, path, bodies, content_type, ok in [
            ("publish", "/events", [event(prefix, n) for n in range(count)], "application/cloudevents+json", 202),
            ("ack", f"/subscriptions/{name}/ack", None, "application/json", 200),
        ]:
            if bodies is None:  # the receipts of everything published, leased for long enough
                receipts: list[str] = []
                while len(receipts) < count:
                    body = {"max_messages": 100, "visibility_timeout_s": 600}
                    async with session.post(f"{url}/subscriptions/{name}/receive", json=body) as response:
                        receipts += [m["receipt"] for m in (await response.json())["messages"]]
                bodies = [json.dumps({"receipts": [r]}).encode() for r in receipts]
            before = cpu_s(pid)
            wall = await drive(session, url + path, bodies, content_type, ok)
            used = cpu_s(pid) - before
            result[f"{phase}_cpu_us_per_request"] = round(used / count * 1e6, 1)
            result[f"{phase}_requests_per_cpu_s"] = round(count / used)
            result[f"{phase}_requests_per_s"] = round(count / wall)
        async with session.delete(f"{url}/subscriptions/{name}") as response:
            await response.read()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=6000, help="per phase and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1], help="checkout to run")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the router, repeatable")
    args = parser.parse_args()
    import uvloop

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as data:
        port = free_port()
        env = {**os.environ, "CATTUBE_DATA_DIR": data, "CATTUBE_LOG_LEVEL": "info"}
        env.update({"CATTUBE_ROUTER_DURABILITY": "batched", **dict(e.split("=", 1) for e in args.env)})
        argv = [sys.executable, "-m", "router", "--port", str(port)]
        proc = subprocess.Popen(argv, cwd=args.repo, env=env, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stderr is not None
            for line in proc.stderr:  # bounded by the router's start-up; uvicorn logs this line once it listens
                if "Uvicorn running" in line:
                    break
            else:
                raise RuntimeError("the router exited before it was ready")
            # Keep reading its log, so a full pipe never stalls it.
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            url = f"http://127.0.0.1:{port}"
            uvloop.run(one_round(url, proc.pid, 1000))  # warm-up
            rounds = [uvloop.run(one_round(url, proc.pid, args.requests)) for _ in range(args.rounds)]
        finally:
            proc.terminate()
            proc.wait(30)
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "repo": str(args.repo), "env": args.env}
    result["load_average_before"] = [round(x, 2) for x in load_before]
    for key in rounds[0]:
        result[key] = sorted(r[key] for r in rounds)
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
