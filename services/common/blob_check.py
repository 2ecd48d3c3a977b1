"""The blob store checked at start-up, and again until it answers: a wrong bucket is a sentence on /readyz, not a crash.

    check = BlobStoreCheck(store)
    supervisor.start("blob-check", check.run())     # store.check() now, then with backoff until it passes
    await check.first_verdict()                     # up to a few seconds, before serving
    ops_router(registry, [supervisor.readiness, check.readiness])
    ...
    check.stop()                                    # at shutdown

A missing bucket or refused credentials (`Unavailable` from `BlobStore.check`) leaves the service
up and not ready, `/readyz` naming the bucket and the reason, while the check goes on in the
background with exponential backoff: an operator who creates the bucket or fixes the keys sees the
service become ready without restarting it. Requests that need the bucket meanwhile get the same
503 from the store itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

from services.common.blobs import BlobStore
from services.common.errors import Unavailable

__all__ = ["BlobStoreCheck"]

log = logging.getLogger(__name__)


class BlobStoreCheck:
    def __init__(self, store: BlobStore, *, backoff_initial_s: float = 0.5, backoff_max_s: float = 30.0) -> None:
        self.store = store
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.passed = asyncio.Event()
        self.answered = asyncio.Event()
        """Set once the first check has a verdict, passed or not."""
        self.last_error: str | None = None
        self.failures = 0
        self._stopped = asyncio.Event()

    def stop(self) -> None:
        self._stopped.set()

    async def run(self) -> None:
        """Check until the store answers, then wait for `stop()` (a supervised loop ends only at shutdown)."""
        while not self._stopped.is_set():
            try:
                await self.store.check()
            except Unavailable as exc:
                self.failures += 1
                self.last_error = exc.detail
                self.answered.set()
                await self._back_off()
                continue
            self.last_error = None
            self.passed.set()
            self.answered.set()
            if self.failures:
                log.info("the blob store %r answers now, after %d failed check(s)", self.store, self.failures)
            break
        await self._stopped.wait()

    async def _back_off(self) -> None:
        # Equal jitter, as the outbox relay: never at once, and replicas do not retry in step.
        ceiling = min(self.backoff_max_s, self.backoff_initial_s * 2 ** (self.failures - 1))
        delay = ceiling / 2 + random.uniform(0, ceiling / 2)
        log.error("the blob store cannot be used: %s; checking again in %.1f s", self.last_error, delay)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._stopped.wait()

    async def first_verdict(self, timeout_s: float = 5) -> None:
        """Wait (up to `timeout_s`) for the first check: a service whose store is fine is ready as soon as it
        serves, and one whose S3 is slow to answer still starts (the check goes on in the background)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self.answered.wait()

    async def readiness(self) -> str | None:
        if self.passed.is_set():
            return None
        if self.last_error is not None:
            return f"the blob store cannot be used: {self.last_error} (checking again in the background)"
        return f"the blob store {self.store!r} has not been checked yet"
