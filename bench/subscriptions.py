"""Many subscriptions: how PUTs and a restart cost as the catalog grows.

    .venv/bin/python bench/subscriptions.py --count 2000 [--clients 16] [--repo PATH]

Starts the router as a process (`python -m router`, SQLite in a temporary directory, from `--repo`:
this checkout by default, or another one for an A/B), creates `--count` queue subscriptions from
`--clients` concurrent clients, then restarts the router twice. The baseline is in the same run: the
PUT rate of the first `--window` subscriptions (into an almost empty catalog) against the rate of the
last `--window` (into a full one), and a restart with an empty catalog against one with all of them.
A ratio of 1.0 means the catalog's size costs nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
TOKEN = "bench-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_router(repo: Path, data: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "CATTUBE_DATA_DIR": str(data), "CATTUBE_TOKEN": TOKEN, "CATTUBE_LOG_LEVEL": "warning"}
    command = [sys.executable, "-m", "router", "--port", str(port)]
    return subprocess.Popen(command, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def until_ready(client: httpx.AsyncClient, port: int) -> float:
    """Seconds until /readyz answers 200 (a bench's start-up wait: asked every 20 ms)."""
    started = time.perf_counter()
    while True:
        try:
            if (await client.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                return time.perf_counter() - started
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.02)


async def put_range(client: httpx.AsyncClient, port: int, names: range, clients: int) -> float:
    """Seconds to PUT one queue subscription per number in `names`, `clients` at a time."""
    pending = iter(names)

    async def one_client() -> None:
        for n in pending:
            body = {"pattern": {"type": [f"bench.t{n}"]}, "target": {"queue": {}}}
            answer = await client.put(f"http://127.0.0.1:{port}/subscriptions/s{n:06d}", json=body)
            answer.raise_for_status()

    started = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    return time.perf_counter() - started


async def restart(client: httpx.AsyncClient, repo: Path, data: Path, port: int) -> float:
    process = start_router(repo, data, port)
    try:
        return await until_ready(client, port)
    finally:
        process.terminate()
        process.wait()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--window", type=int, default=200)
    parser.add_argument("--repo", type=Path, default=REPO)
    args = parser.parse_args()
    window = min(args.window, args.count // 2)
    data = Path(tempfile.mkdtemp(prefix="cattube-bench-subs-"))
    port = free_port()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    try:
        async with httpx.AsyncClient(headers=headers, timeout=120) as client:
            empty_start = await restart(client, args.repo, data, port)
            process = start_router(args.repo, data, port)
            try:
                await until_ready(client, port)
                first = await put_range(client, port, range(window), args.clients)
                middle = await put_range(client, port, range(window, args.count - window), args.clients)
                last = await put_range(client, port, range(args.count - window, args.count), args.clients)
            finally:
                process.terminate()
                process.wait()
            full_starts = [await restart(client, args.repo, data, port) for _ in range(2)]
    finally:
        shutil.rmtree(data, ignore_errors=True)
    total = first + middle + last
    print(f"repo {args.repo}, load average {os.getloadavg()[0]:.2f}")
    print(f"{args.count} PUTs from {args.clients} clients: {total:.1f} s ({args.count / total:.0f} PUTs/s)")
    print(
        f"first {window}: {window / first:.0f} PUTs/s; last {window}: {window / last:.0f} PUTs/s; "
        f"ratio last/first {first / last:.2f}"
    )
    best = min(full_starts)
    print(
        f"restart: empty {empty_start:.2f} s; with {args.count}: {best:.2f} s (best of 2); "
        f"ratio {empty_start / best:.2f}"
    )


if __name__ == "__main__":
    asyncio.run(main())
