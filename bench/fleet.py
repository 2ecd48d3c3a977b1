"""Connections a processing fleet holds to the router: N idle workers, counted from /proc.

    .venv/bin/python bench/fleet.py [--workers 1337] [--nofile 1024] [--source DIR]

Starts a router and a processing service (the code in `--source`, default this checkout: point it
at an older checkout, e.g. from `git archive`, to compare) with min_workers = max_workers = N,
waits until `GET /autoscaler` shows the fleet running and its receives have had time to reach the
router, then reports from /proc: the processing service's TCP connections to the router's port,
the router's open files, and whether the router still answers `/healthz` and a publish. With
`--nofile`, both processes run under that RLIMIT_NOFILE (soft and hard), as on a default Linux
login.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from harness import REPO, free_port

TOKEN = "bench"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def connections_to(pid: int, port: int) -> int:
    """Established TCP connections of `pid` whose remote end is `port` (on any local address)."""
    mine = socket_inodes(pid)
    count = 0
    for table in ("tcp", "tcp6"):
        lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        for line in lines:
            fields = line.split()
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if remote_port == port and fields[3] == "01" and fields[9] in mine:
                count += 1
    return count


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def start(module: str, port: int, env: dict[str, str], source: Path, nofile: int | None) -> subprocess.Popen[bytes]:
    def limit() -> None:
        if nofile:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    return subprocess.Popen(
        [sys.executable, "-m", module, "--port", str(port)],
        cwd=source,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=limit,
    )


def wait_for(url: str, ready: Any, timeout_s: float = 120) -> Any:
    """Start-up only: ask every half second until `ready(response)` holds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            response = httpx.get(url, headers=AUTH, timeout=5)
            if ready(response):
                return response.json()
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=1337)
    parser.add_argument("--nofile", type=int, default=None, help="RLIMIT_NOFILE of both processes")
    parser.add_argument("--source", type=Path, default=REPO, help="the checkout whose code runs")
    parser.add_argument("--settle-s", type=float, default=5.0, help="wait this long before counting")
    args = parser.parse_args()

    data = Path(tempfile.mkdtemp(prefix="cattube-fleet-"))
    router_port, processing_port = free_port(), free_port()
    router_url = f"http://127.0.0.1:{router_port}"
    env = {
        "CATTUBE_DATA_DIR": str(data),
        "CATTUBE_TOKEN": TOKEN,
        "CATTUBE_ROUTER_URL": router_url,
        "CATTUBE_MIN_WORKERS": str(args.workers),
        "CATTUBE_MAX_WORKERS": str(args.workers),
    }
    router = start("router", router_port, env, args.source, args.nofile)
    processing = start("services.processing", processing_port, env, args.source, args.nofile)
    try:
        wait_for(f"{router_url}/healthz", lambda r: r.status_code == 200)
        state = wait_for(
            f"http://127.0.0.1:{processing_port}/autoscaler",
            lambda r: (
                r.status_code == 200 and r.json()["running"] >= r.json().get("max_workers_effective", args.workers)
            ),
        )
        time.sleep(args.settle_s)  # let every worker's first receive reach the router
        state = httpx.get(f"http://127.0.0.1:{processing_port}/autoscaler", headers=AUTH, timeout=10).json()
        report: dict[str, Any] = {
            "workers asked": args.workers,
            "nofile": args.nofile or resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            "running": state["running"],
            "max_workers_effective": state.get("max_workers_effective"),
            "processing connections to the router": connections_to(processing.pid, router_port),
            "router open files": open_files(router.pid),
            "processing open files": open_files(processing.pid),
        }
        try:
            health = httpx.get(f"{router_url}/healthz", timeout=5).status_code
        except httpx.TransportError as exc:
            health = f"{type(exc).__name__}"
        report["router /healthz"] = health
        event = {"specversion": "1.0", "id": "fleet-1", "source": "bench", "type": "bench.ping", "data": {}}
        try:
            headers = {**AUTH, "Content-Type": "application/cloudevents+json"}
            answer = httpx.post(f"{router_url}/events", content=json.dumps(event), headers=headers, timeout=5)
            published = answer.status_code if answer.status_code < 400 else f"{answer.status_code} {answer.text[:200]}"
        except httpx.TransportError as exc:
            published = f"{type(exc).__name__}"
        report["router publish"] = published
        print(json.dumps(report, indent=2))
    finally:
        for proc in (processing, router):
            proc.terminate()
        for proc in (processing, router):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
