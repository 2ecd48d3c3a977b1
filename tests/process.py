"""Real service processes on loopback ports, for whole-stack and crash tests."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOG_LINES_SHOWN = 200

STARTED: list[ServiceProcess] = []
"""Processes started during the current test: a failing test shows their logs (tests/conftest.py)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class ServiceProcess:
    module: str
    port: int
    env: dict[str, str]
    host: str = "127.0.0.1"
    prefix: list[str] = field(default_factory=list)
    """Run through this first, e.g. `ip netns exec NAME` to start the service on another "host"."""
    proc: asyncio.subprocess.Process | None = None
    log: list[str] = field(default_factory=list)
    _reader: asyncio.Task[None] | None = None
    _waiters: list[tuple[str, asyncio.Future[str]]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self, timeout_s: float = 30) -> None:
        """Start the process and return once uvicorn says it is serving (read from its log, not polled)."""
        self.proc = await asyncio.create_subprocess_exec(
            *self.prefix, sys.executable, "-m", self.module, "--host", self.host, "--port", str(self.port),
            cwd=REPO, env={**os.environ, **self.env}, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        if self not in STARTED:
            STARTED.append(self)
        started = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read_log(started))
        try:
            await asyncio.wait_for(started, timeout_s)
        except BaseException:
            await self.kill()
            raise RuntimeError(f"{self.module} did not start:\n" + "\n".join(self.log[-40:])) from None

    def log_tail(self) -> str:
        return "\n".join(self.log[-LOG_LINES_SHOWN:])

    async def _read_log(self, started: asyncio.Future[None]) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.log.append(line)
            for text, waiter in self._waiters:
                if text in line and not waiter.done():
                    waiter.set_result(line)
            if "Uvicorn running on" in line and not started.done():
                started.set_result(None)
        if not started.done():
            started.set_exception(RuntimeError("exited"))

    async def wait_for_log(self, text: str, timeout_s: float = 30) -> str:
        """The first log line from now on that holds `text` (woken by each line, not polled)."""
        waiter: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiters.append((text, waiter))
        try:
            return await asyncio.wait_for(waiter, timeout_s)
        finally:
            self._waiters.remove((text, waiter))

    async def kill(self) -> None:
        """kill -9: no shutdown code runs."""
        await self._end(signal.SIGKILL)

    async def stop(self) -> int:
        """SIGTERM, and wait for a clean exit; returns the exit code."""
        return await self._end(signal.SIGTERM)

    async def _end(self, sig: int) -> int:
        if self.proc is None:
            return 0
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        code = await asyncio.wait_for(self.proc.wait(), 60)
        if self._reader is not None:
            await self._reader
        self.proc = None
        return code


@asynccontextmanager
async def service(module: str, env: dict[str, str], port: int | None = None) -> AsyncIterator[ServiceProcess]:
    proc = ServiceProcess(module, port or free_port(), env)
    await proc.start()
    try:
        yield proc
    finally:
        await proc.kill()
