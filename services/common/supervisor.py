"""Background loops that must not die quietly.

Each service runs its long-lived loops (the bus writer, an outbox relay, the autoscaler) under a
`Supervisor`. A loop that ends with an exception while the service is not stopping makes
`/readyz` fail and, in a real process, raises SIGTERM so the process exits and is restarted
rather than lingering as a zombie that answers `/healthz` but does no work.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


class Supervisor:
    def __init__(self, *, exit_on_failure: bool = True) -> None:
        self.exit_on_failure = exit_on_failure
        self.failures: dict[str, str] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stopping = False

    def start(self, name: str, loop: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(loop, name=name)
        self._tasks[name] = task
        task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if self._stopping or task.cancelled():
            return
        exc = task.exception()
        reason = f"{task.get_name()} stopped: {exc!r}" if exc else f"{task.get_name()} stopped unexpectedly"
        self.failures[task.get_name()] = reason
        log.error("background loop failed, the service is not ready: %s", reason, exc_info=exc)
        if self.exit_on_failure:
            os.kill(os.getpid(), signal.SIGTERM)

    def begin_stop(self) -> None:
        """From now on a loop that ends is expected to: the service is shutting down."""
        self._stopping = True

    async def readiness(self) -> str | None:
        return "; ".join(self.failures.values()) or None

    async def drain(self, timeout_s: float) -> None:
        """Let the loops finish on their own (they were told to stop), then cancel what is left."""
        self.begin_stop()
        tasks = list(self._tasks.values())
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
