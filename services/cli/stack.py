"""The services of `cattube up` as child processes: their ports checked before anything starts,
started in dependency order, restarted when they crash once the stack is up, and stopped one by one
with the routers last. `cattube up --cluster` runs more of them (two routers, two processing
instances) and an S3 server the same way (services.cli.cluster)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx

from services.cli.failure import Failure

SERVICES = [
    ("router", "router", "router_port"),
    ("upload", "services.upload", "upload_port"),
    ("processing", "services.processing", "processing_port"),
    ("store", "services.store", "store_port"),
]
"""Each service: its name, the module `python -m` runs, and the setting holding its port."""
STOP_ORDER = ("upload", "store", "processing", "router", "s3")
"""Roles, what takes work in first, the router last: processing hands its running jobs back through it.
The bucket goes after everything that writes to it."""
START_ORDER = (("s3",), ("router",), ("upload", "processing", "store"))
"""Roles started together, each group once the one before serves."""
STOP_DEADLINE_S = 5.0
"""How long one service has to exit after SIGTERM before it is killed."""
STARTUP_DEADLINE_S = 60.0
START_RESTARTS = 1
"""Restarts allowed before the stack is first up; a service that keeps dying by then will not start."""
RESTART_BACKOFF_MAX_S = 30.0
STABLE_S = 60.0
"""A service that ran this long before it died starts its restart backoff over."""
SERVING = "Uvicorn running on"
"""uvicorn's line once the app has started and its socket listens (logged at INFO)."""


@dataclass
class Child:
    name: str
    module: str
    port: int
    port_field: str
    """The setting (or, for a cluster's extra parts, the variable) that moves its port."""
    role: str = ""
    """What it is (a STOP_ORDER role): the name, unless several children share a role."""
    env: dict[str, str] = field(default_factory=dict)
    """Variables of its own, on top of the stack's."""
    command: list[str] | None = None
    """What to run instead of `python -m module --port PORT` (the S3 server)."""
    ready_text: str = SERVING
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0
    serving: bool = False

    def __post_init__(self) -> None:
        self.role = self.role or self.name

    @property
    def variable(self) -> str:
        return self.port_field if self.port_field.isupper() else f"CATTUBE_{self.port_field.upper()}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


def check_ports(host: str, children: list[Child]) -> None:
    """Raise a Failure naming every port that cannot be listened on, and the variable that moves it."""
    problems: list[tuple[Child, str]] = []
    owners: dict[int, str] = {}
    for child in children:
        if child.port in owners:
            problems.append((child, f"also given to {owners[child.port]}"))
            continue
        owners[child.port] = child.name
        reason = _cannot_listen(host, child.port)
        if reason:
            problems.append((child, reason))
    if problems:
        where = "; ".join(f"port {child.port} ({child.name}): {reason}" for child, reason in problems)
        variables = ", ".join(child.variable for child, _ in problems)
        raise Failure(
            f"cannot listen on {host}: {where}\n"
            f"free it (is another `cattube up` running?) or choose another port with {variables}"
        )


def _cannot_listen(host: str, port: int) -> str | None:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is free
            sock.bind(address)
    except OSError as exc:
        return (exc.strerror or str(exc)).lower()
    return None


ReadyHook = Callable[[], Awaitable[None]]


class Stack:
    def __init__(
        self,
        host: str,
        children: list[Child],
        env: dict[str, str],
        log_level: str,
        when_serving: dict[str, ReadyHook] | None = None,
    ) -> None:
        self.host = host
        self.when_serving = when_serving or {}
        """Per role: what to do once its group serves, before the next group starts (make the bucket)."""
        self.children = {child.name: child for child in children}
        self.env = env
        # Below INFO uvicorn does not say it is serving: then /healthz is asked instead.
        self.announces = log_level.lower() in ("debug", "info")
        self.changed = asyncio.Event()
        """Set whenever a child starts serving or dies, or a stop is asked for."""
        self.up = False
        self.stopping = False
        self.killing = False
        self.broken: str | None = None
        self.tasks: list[asyncio.Task[None]] = []

    # -- starting -------------------------------------------------------------------------------

    async def start(self) -> None:
        """The routers first (everything else talks to them), then the others; returns once each serves."""
        for roles in START_ORDER:
            names = [child.name for child in self.children.values() if child.role in roles]
            if not names:
                continue
            self.tasks += [asyncio.create_task(self._keep_running(self.children[name])) for name in names]
            await self._until_serving(names)
            if self.stopping:
                return
            for role in roles:
                if role in self.when_serving:
                    await self.when_serving[role]()
        self.up = True

    async def _until_serving(self, names: list[str]) -> None:
        try:
            async with asyncio.timeout(STARTUP_DEADLINE_S):
                while not (self.stopping or self.broken or all(self.children[n].serving for n in names)):
                    await self.changed.wait()
                    self.changed.clear()
        except TimeoutError:
            late = ", ".join(n for n in names if not self.children[n].serving)
            raise Failure(f"{late} did not start within {STARTUP_DEADLINE_S:g}s; see the log above") from None
        if self.broken:
            raise Failure(self.broken)

    async def _keep_running(self, child: Child) -> None:
        loop = asyncio.get_running_loop()
        while not self.stopping:
            started = loop.time()
            # A process group of its own: a Ctrl-C at the terminal reaches `cattube up` only, which
            # then stops the services in order (the terminal would signal them all at once).
            command = child.command or [sys.executable, "-m", child.module, "--port", str(child.port)]
            child.proc = await asyncio.create_subprocess_exec(
                *command, env={**self.env, **child.env}, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, process_group=0,
            )  # fmt: skip
            if self.stopping:  # asked while it was being spawned: `stop` may have passed it by already
                child.proc.terminate()
            quiet = not self.announces and child.command is None
            asking = asyncio.create_task(self._ask_healthz(child)) if quiet else None
            await self._pump(child)
            code = await child.proc.wait()
            if asking is not None:
                asking.cancel()
            child.serving = False
            self.changed.set()
            if self.stopping:
                return
            if loop.time() - started > STABLE_S:
                child.restarts = 0
            child.restarts += 1
            if not self.up and child.restarts > START_RESTARTS:
                self.broken = (
                    f"{child.name} exited {child.restarts} times while starting (last status {code}); see its log above"
                )
                self.changed.set()
                return
            delay = min(RESTART_BACKOFF_MAX_S, 0.5 * 2 ** min(child.restarts, 6))
            print(
                f"{child.name:>10} | exited with status {code}; restarting in {delay:.1f}s (restart #{child.restarts})"
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._until_stopping(), delay)

    async def _until_stopping(self) -> None:
        while not self.stopping:
            await self.changed.wait()
            self.changed.clear()

    async def _pump(self, child: Child) -> None:
        assert child.proc is not None and child.proc.stdout is not None
        async for raw in child.proc.stdout:
            text = raw.decode(errors="replace")
            sys.stdout.write(f"{child.name:>10} | {text}")
            sys.stdout.flush()
            if child.ready_text in text and not child.serving:
                child.serving = True
                self.changed.set()

    async def _ask_healthz(self, child: Child) -> None:
        """For quiet log levels: ask /healthz, the transport retrying refused connections with backoff."""
        transport = httpx.AsyncHTTPTransport(retries=7)  # 0.5 s, 1 s, 2 s, ... about a minute in all
        async with httpx.AsyncClient(transport=transport, timeout=10) as client:
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"http://127.0.0.1:{child.port}/healthz")).status_code == 200:
                    child.serving = True
                    self.changed.set()

    # -- stopping -------------------------------------------------------------------------------

    def ask_to_stop(self) -> None:
        """First Ctrl-C: stop in order. Second: kill everything at once."""
        if self.stopping:
            self.kill_all()
            return
        self.stopping = True
        self.changed.set()

    def kill_all(self) -> None:
        if self.killing:
            return
        self.killing = True
        print("CatTube: killing every service now")
        for child in self.children.values():
            _kill(child)

    async def until_stop_asked(self) -> None:
        await self._until_stopping()

    async def stop(self) -> None:
        """Each service in STOP_ORDER: SIGTERM, wait for it (killed after STOP_DEADLINE_S), then the next."""
        self.stopping = True
        self.changed.set()
        for child in sorted(self.children.values(), key=lambda child: STOP_ORDER.index(child.role)):
            name = child.name
            if not child.running:
                continue
            assert child.proc is not None
            if not self.killing:
                print(f"CatTube: stopping {name}", flush=True)
                child.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(STOP_DEADLINE_S):
                    code = await child.proc.wait()
            except TimeoutError:
                _kill(child)
                code = await child.proc.wait()
                print(f"CatTube: {name} did not stop within {STOP_DEADLINE_S:g}s: killed", flush=True)
            else:
                # uvicorn ends a clean shutdown by raising the SIGTERM it caught again: -15 is a clean stop.
                status = "" if code in (0, -signal.SIGTERM) else f" (status {code})"
                print(f"CatTube: {name} {'killed' if self.killing else 'stopped'}{status}", flush=True)
        await asyncio.gather(*self.tasks, return_exceptions=True)


def _kill(child: Child) -> None:
    """SIGKILL the service's whole process group (it leads one): its ffmpeg children go with it."""
    if child.running:
        assert child.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.proc.pid, signal.SIGKILL)
