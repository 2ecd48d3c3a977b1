"""What every benchmark script needs: free ports, a process's CPU time, and a server started for a run.

The scripts run as `python bench/NAME.py`, so this module is imported by its plain name.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cpu_s(pid: int, *, children: bool = False) -> float:
    """User + system CPU seconds of a process (from /proc), with `children` plus its reaped children's:
    a measure the noise of a shared machine barely moves, unlike throughput."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    used = int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if children else 0)
    return used / os.sysconf("SC_CLK_TCK")


@dataclass
class Server:
    url: str
    pid: int


@contextmanager
def serving(argv: list[str], url: str, env: dict[str, str] | None = None) -> Iterator[Server]:
    """Start a server process and wait (bounded, start-up only) until `url` answers."""
    proc = subprocess.Popen(argv, cwd=REPO, env={**os.environ, **(env or {})}, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                httpx.get(url + "/openapi.json", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        yield Server(url, proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
