"""Server processes for a benchmark: started in a session of their own, ready when they say so, stopped by pid.

A server is ready when a line of its own output says so (each broker logs one), not when a poll
succeeds; its output goes to a log file in the run's temporary directory, which an error quotes.
Stopping sends SIGTERM to the pid that was started and waits for it, then ends whatever of its
children outlived it (RabbitMQ's Erlang VM has helpers), each by pid, checked by start time.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from pathlib import Path

from bench.harness import cpu_s

_UTIME, _STARTTIME = 11, 19  # /proc/PID/stat fields after the command name (utime is field 14, starttime 22)


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def _started(pid: int) -> str | None:
    """The process's start time (clock ticks since boot): tells a pid from a later process given the same number."""
    fields = _stat(pid)
    return fields[_STARTTIME] if fields else None


def descendants(root: int) -> list[tuple[int, str]]:
    """The live descendants of `root`, as (pid, start time), parents before children."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))):
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[tuple[int, str]] = []
    pending = list(children.get(root, []))
    while pending:
        pid = pending.pop(0)
        if (start := _started(pid)) is not None:
            found.append((pid, start))
            pending.extend(children.get(pid, []))
    return found


def tree_cpu_s(root: int) -> float:
    """CPU seconds of `root`, its reaped children and its live descendants: a server's whole cost."""
    total = cpu_s(root, children=True)
    for pid, _ in descendants(root):
        try:
            total += cpu_s(pid, children=True)
        except (FileNotFoundError, ProcessLookupError):
            pass  # ended between the listing and the read; its time went to its parent
    return total


async def gone(pid: int, timeout_s: float) -> bool:
    """Wait (on a pidfd, no polling) until `pid` has exited; False if it still runs after `timeout_s`."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await asyncio.wait_for(exited, timeout_s)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
        os.close(fd)


class ServerProcess:
    """One server process: `start()` returns once its output matched `ready`, `stop()` ends it and its children."""

    def __init__(self, name: str, argv: list[str], log_path: Path, *, env: dict[str, str], cwd: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.log_path = log_path
        self._log = log_path.open("wb")
        self._proc: asyncio.subprocess.Process | None = None
        self._pump: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None, "not started"
        return self._proc.pid

    async def start(self, ready: str, timeout_s: float) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            *self.argv,
            cwd=self.cwd,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # a terminal's Ctrl-C reaches the benchmark, which stops its servers in order
            limit=1 << 20,
        )
        seen = asyncio.Event()
        self._pump = asyncio.create_task(self._copy_output(re.compile(ready.encode()), seen))
        waiters = {asyncio.create_task(seen.wait()), asyncio.create_task(self._proc.wait())}
        await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()
        if not seen.is_set():
            code, tail = self._proc.returncode, self.tail()
            await self.stop()
            why = f"exited with {code}" if code is not None else f"did not say it was ready within {timeout_s:.0f} s"
            raise RuntimeError(f"{self.name} {why}; its output ({self.log_path}) ends with:\n{tail}")

    async def _copy_output(self, ready: re.Pattern[bytes], seen: asyncio.Event) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        async for line in self._proc.stdout:
            self._log.write(line)
            if not seen.is_set() and ready.search(line):
                self._log.flush()
                seen.set()

    def tail(self, lines: int = 15) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    async def stop(self, grace_s: float = 30) -> None:
        """SIGTERM to the process, SIGKILL after `grace_s`; then any child that outlived it, by pid."""
        if self._proc is None:
            return
        leftovers = descendants(self._proc.pid) if self._proc.returncode is None else []
        if self._proc.returncode is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self._proc.wait(), grace_s)
            except TimeoutError:
                self._proc.kill()
                await self._proc.wait()
        for pid, start in leftovers:
            if _started(pid) != start:
                continue  # ended with its parent (or the number now belongs to someone else)
            try:
                os.kill(pid, signal.SIGTERM)
                if not await gone(pid, 5) and _started(pid) == start:
                    os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # it ended on its own meanwhile
        if self._pump is not None:
            await self._pump
        self._log.close()
