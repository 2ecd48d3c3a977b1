"""Router benchmark: durable publish against a bare endpoint, batched publish, queue receive + ack.

    .venv/bin/python bench/router.py [--duration 10]

Starts the router and, in the same script, a bare FastAPI endpoint that only answers 202, both
under uvicorn; drives both with the same aiohttp load generator in its own process (plain httpx
would measure the client, see DESIGN.md), and prints ratios against the baseline, because this
machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def server(argv: list[str], port: int, env: dict[str, str] | None = None) -> Iterator[str]:
    proc = subprocess.Popen(argv, cwd=REPO, env={**os.environ, **(env or {})}, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):  # start-up only: a bounded wait for the port to answer
            try:
                httpx.get(url + "/openapi.json", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def load(*args: str) -> dict[str, float]:
    out = subprocess.run([PY, str(HERE / "loadgen.py"), *args], check=True, capture_output=True, text=True).stdout
    result: dict[str, float] = json.loads(out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--synchronous", default="FULL", choices=["FULL", "NORMAL"])
    args = parser.parse_args()
    duration = str(args.duration)
    results: dict[str, object] = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores"}

    bare_port = free_port()
    with server([PY, str(HERE / "bare.py"), str(bare_port)], bare_port) as url:
        load("publish", url + "/events", "--duration", "2")  # warm-up
        bare = load("publish", url + "/events", "--concurrency", "16", "--duration", duration)
    results["bare_single"] = bare

    with tempfile.TemporaryDirectory() as data:
        port = free_port()
        env = {"CATTUBE_DATA_DIR": data, "CATTUBE_LOG_LEVEL": "warning", "CATTUBE_SQLITE_SYNCHRONOUS": args.synchronous}
        with server([PY, "-m", "router", "--port", str(port)], port, env) as url:
            httpx.put(f"{url}/subscriptions/bench", json={"pattern": {"source": ["bench"]}, "target": {"queue": {}}})
            httpx.put(f"{url}/subscriptions/other", json={"pattern": {"source": ["nope"]}, "target": {"queue": {}}})
            load("publish", url + "/events", "--duration", "2")  # warm-up
            single = load("publish", url + "/events", "--concurrency", "16", "--duration", duration)
            batched = load("publish", url + "/events", "--concurrency", "4", "--batch", "100", "--duration", duration)
            consumed = load("consume", url, "--subscription", "bench", "--concurrency", "4", "--count", "50000")
    results["router_single"] = single
    results["router_batched_100"] = batched
    results["queue_receive_ack"] = consumed
    results["single_ratio_to_bare"] = round(single["requests_per_s"] / bare["requests_per_s"], 3)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
