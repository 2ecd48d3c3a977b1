"""The whole stack as `cattube up` runs it: four processes on free loopback ports, in a temp dir."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

from services.cli.up import PAGE_LINE
from tests.process import REPO, free_port

SERVICES = ("router", "upload", "processing", "store")
CLUSTER = ("router-1", "router-2", "upload", "processing-1", "processing-2", "store")
"""`cattube up --cluster`'s services; its PostgreSQL and S3 server get free ports too."""
CLUSTER_PORTS = {
    "router-1": "CATTUBE_ROUTER_PORT",
    "router-2": "CATTUBE_CLUSTER_ROUTER2_PORT",
    "upload": "CATTUBE_UPLOAD_PORT",
    "processing-1": "CATTUBE_PROCESSING_PORT",
    "processing-2": "CATTUBE_CLUSTER_PROCESSING2_PORT",
    "store": "CATTUBE_STORE_PORT",
    "postgres": "CATTUBE_CLUSTER_POSTGRES_PORT",
    "s3": "CATTUBE_CLUSTER_S3_PORT",
}


class Stack:
    def __init__(self, data_dir: Path, *, cluster: bool = False, **env: str) -> None:
        self.data_dir = data_dir
        self.cluster = cluster
        self.services = CLUSTER if cluster else SERVICES
        variables = CLUSTER_PORTS if cluster else {name: f"CATTUBE_{name.upper()}_PORT" for name in SERVICES}
        self.ports = {name: free_port() for name in variables}
        self.env = {
            **os.environ,
            "CATTUBE_DATA_DIR": str(data_dir),
            "CATTUBE_LOG_LEVEL": "info",
            **{variables[name]: str(port) for name, port in self.ports.items()},
            **env,
        }
        for variable in ("CATTUBE_TOKEN", "CATTUBE_SERVICE_TOKEN", "CATTUBE_USER_TOKEN"):
            self.env.pop(variable, None)  # `cattube up` makes them
        self.proc: asyncio.subprocess.Process | None = None
        self.log: list[str] = []
        self._reader: asyncio.Task[None] | None = None
        self._running: dict[str, int] = {}
        self._changed = asyncio.Condition()
        self.ended = False
        """`cattube up` closed its output (it exited)."""

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}"

    @property
    def tokens(self) -> dict[str, str]:
        """The tokens `cattube up` made: admin, service and user."""
        saved: dict[str, str] = json.loads((self.data_dir / "tokens.json").read_text())
        return saved

    def auth(self, scope: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[scope]}"}

    async def start(self, timeout_s: float = 60) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli", "up", *(["--cluster"] if self.cluster else []),
            cwd=REPO, env=self.env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        pages = self._pages()
        self._reader = asyncio.create_task(self._read())
        await self.wait_serving(set(self.services), timeout_s)
        # Up means `cattube up` said so: it prints the page once it has seen every service serve.
        try:
            async with asyncio.timeout(timeout_s), self._changed:
                await self._changed.wait_for(lambda: self._pages() > pages)
        except TimeoutError:
            raise AssertionError("cattube up never showed the page:\n" + "\n".join(self.log[-60:])) from None

    def _pages(self) -> int:
        return sum(line.startswith(PAGE_LINE) for line in self.log)

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            name, _, text = line.partition(" | ")
            async with self._changed:
                self.log.append(line)
                if "Uvicorn running on" in text:
                    self._running[name.strip()] = self._running.get(name.strip(), 0) + 1
                self._changed.notify_all()
        async with self._changed:
            self.ended = True
            self._changed.notify_all()

    async def wait_serving(self, names: set[str], timeout_s: float = 60, starts: int = 1) -> None:
        """Until each named service has said it is serving `starts` times (read from the logs, not polled)."""
        try:
            async with asyncio.timeout(timeout_s), self._changed:
                await self._changed.wait_for(
                    lambda: self.ended or all(self._running.get(n, 0) >= starts for n in names)
                )
        except TimeoutError:
            raise AssertionError("the stack did not start:\n" + "\n".join(self.log[-60:])) from None
        if not all(self._running.get(n, 0) >= starts for n in names):
            raise AssertionError("cattube up exited:\n" + "\n".join(self.log[-60:]))

    async def wait_line(self, start: str, timeout_s: float = 60) -> int:
        """Until `cattube up` has printed a line starting with `start`; returns its index in the log."""

        def found() -> int | None:
            return next((i for i, line in enumerate(self.log) if line.startswith(start)), None)

        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(lambda: found() is not None)
        index = found()
        assert index is not None
        return index

    def pid_of(self, service: str) -> int:
        """The process of one service, a child of `cattube up`."""
        assert self.proc is not None
        module = {"router": "router"}.get(service, f"services.{service}")
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == self.proc.pid and module.encode() in cmdline:
                return int(entry.name)
        raise LookupError(f"no {service} process")

    async def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(self.proc.wait(), 60)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._reader is not None:
            await self._reader
