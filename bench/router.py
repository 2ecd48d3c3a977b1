"""Router benchmark: durable publish against a bare endpoint, batched publish, queue receive + ack.

    .venv/bin/python bench/router.py [--duration 10]

Starts the router and, in the same script, a bare FastAPI endpoint that only answers 202, both
under uvicorn; drives both with the same aiohttp load generator in its own process (plain httpx
would measure the client, see bench/README.md), and prints ratios against the baseline, because this
machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from harness import Server, cpu_s, free_port, serving

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = sys.executable


def measured(server: Server, *args: str) -> dict[str, float]:
    """Run the load generator and add the server's CPU per request (µs) to its result."""
    before = cpu_s(server.pid)
    result = load(*args)
    requests = result["requests_per_s"] * result["elapsed_s"] if "requests_per_s" in result else result["requests"]
    result["server_cpu_us_per_request"] = round((cpu_s(server.pid) - before) / requests * 1e6, 1)
    return result


def load(*args: str) -> dict[str, float]:
    out = subprocess.run([PY, str(HERE / "loadgen.py"), *args], check=True, capture_output=True, text=True).stdout
    result: dict[str, float] = json.loads(out)
    return result


def push_bench(synchronous: str, duration: str) -> dict[str, object]:
    """Push latency at 1,000 events/s, and the highest sustained push rate to one consumer."""
    out: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as data:
        port = free_port()
        env = {"CATTUBE_DATA_DIR": data, "CATTUBE_LOG_LEVEL": "warning", "CATTUBE_SQLITE_SYNCHRONOUS": synchronous}
        with serving([PY, "-m", "router", "--port", str(port)], f"http://127.0.0.1:{port}", env) as router:
            rate, seconds = float(os.environ.get("PUSH_RATE", "1000")), float(duration)
            count = int(rate * seconds)
            receiver_port = free_port()
            receiver = subprocess.Popen(
                [PY, str(HERE / "receiver.py"), str(receiver_port), str(count)], stdout=subprocess.PIPE, text=True
            )
            time.sleep(1)
            target = {"url": f"http://127.0.0.1:{receiver_port}/hook"}
            httpx.put(
                f"{router.url}/subscriptions/latency", json={"pattern": {"type": ["bench.paced"]}, "target": target}
            )
            load("paced", router.url + "/events", "--rate", str(rate), "--duration", str(seconds))
            out["latency_at_1000_per_s"] = json.loads(receiver.communicate(timeout=120)[0])
            httpx.delete(f"{router.url}/subscriptions/latency")

            # Throughput: a backlog published first, then a new subscription drains it from the start.
            backlog = 30_000
            first = load("publish", router.url + "/events", "--concurrency", "4", "--batch", "100", "--duration", "1")
            more = backlog - int(first["events_per_s"] * first["elapsed_s"])
            while more > 0:
                step = load(
                    "publish", router.url + "/events", "--concurrency", "4", "--batch", "100", "--duration", "1"
                )
                more -= int(step["events_per_s"] * step["elapsed_s"])
            receiver_port = free_port()
            total = backlog - more  # what was published, at least `backlog`
            receiver = subprocess.Popen(
                [PY, str(HERE / "receiver.py"), str(receiver_port), str(total)], stdout=subprocess.PIPE, text=True
            )
            time.sleep(1)
            before = cpu_s(router.pid)
            httpx.put(
                f"{router.url}/subscriptions/drain",
                json={
                    "pattern": {"type": ["bench.event"]},
                    "target": {"url": f"http://127.0.0.1:{receiver_port}/hook"},
                    "delivery": {"max_in_flight": 16},
                    "start": "earliest",
                },
                timeout=120,
            )
            drained = json.loads(receiver.communicate(timeout=600)[0])
            drained["server_cpu_us_per_event"] = round((cpu_s(router.pid) - before) / total * 1e6, 1)
            out["sustained_max_in_flight_16"] = drained
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--synchronous", default="FULL", choices=["FULL", "NORMAL"])
    parser.add_argument("--only", choices=["push"], help="run one part alone")
    args = parser.parse_args()
    if args.only == "push":
        print(json.dumps(push_bench(args.synchronous, str(args.duration)), indent=2))
        return
    duration = str(args.duration)
    results: dict[str, object] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }

    bare_port = free_port()
    with serving([PY, str(HERE / "bare.py"), str(bare_port)], f"http://127.0.0.1:{bare_port}") as bare_server:
        url = bare_server.url
        load("publish", url + "/events", "--duration", "2")  # warm-up
        bare = measured(bare_server, "publish", url + "/events", "--concurrency", "16", "--duration", duration)
    results["bare_single"] = bare

    with tempfile.TemporaryDirectory() as data:
        port = free_port()
        env = {"CATTUBE_DATA_DIR": data, "CATTUBE_LOG_LEVEL": "warning", "CATTUBE_SQLITE_SYNCHRONOUS": args.synchronous}
        with serving([PY, "-m", "router", "--port", str(port)], f"http://127.0.0.1:{port}", env) as router:
            url = router.url
            httpx.put(f"{url}/subscriptions/bench", json={"pattern": {"source": ["bench"]}, "target": {"queue": {}}})
            httpx.put(f"{url}/subscriptions/other", json={"pattern": {"source": ["nope"]}, "target": {"queue": {}}})
            load("publish", url + "/events", "--duration", "2")  # warm-up
            single = measured(router, "publish", url + "/events", "--concurrency", "16", "--duration", duration)
            batched = measured(
                router, "publish", url + "/events", "--concurrency", "4", "--batch", "100", "--duration", duration
            )
            consumed = measured(
                router, "consume", url, "--subscription", "bench", "--concurrency", "4", "--count", "50000"
            )
        results["push"] = push_bench(args.synchronous, duration)
    results["router_single"] = single
    results["router_batched_100"] = batched
    results["queue_receive_ack"] = consumed
    results["single_ratio_to_bare"] = round(single["requests_per_s"] / bare["requests_per_s"], 3)
    results["single_cpu_ratio_bare_to_router"] = round(
        bare["server_cpu_us_per_request"] / single["server_cpu_us_per_request"], 3
    )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
