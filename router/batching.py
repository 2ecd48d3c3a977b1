"""Group commit: many callers, one writer, one transaction for whatever queued up meanwhile.

Callers `submit` an item and wait for its result. One `run` loop takes everything submitted while
the previous commit was under way and commits it together, so concurrent callers share a
transaction (and its fsync) and each is answered only after the commit that holds its item.
The bus uses it for publishes; each push dispatcher for the outcomes of its deliveries.

One item must not fail the others: when a shared commit fails, each of its items is committed
again on its own (`commit` is all-or-nothing, so the failed attempt left nothing behind), and
only the items that fail alone are answered with the error.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from services.common.errors import Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class GroupCommit(Generic[T, R]):
    def __init__(
        self,
        name: str,
        commit: Callable[[list[T]], Awaitable[list[R]]],
        *,
        weight: Callable[[T], int] = lambda item: 1,
        max_weight: int = 10_000,
    ) -> None:
        self.name = name
        self._commit = commit
        self._weight = weight
        self._max_weight = max_weight
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._wake = asyncio.Event()
        self._stopping = False

    async def submit(self, item: T) -> R:
        if self._stopping:
            raise Unavailable(f"{self.name} is shutting down")
        done: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, done))
        self._wake.set()
        # A caller that goes away cancels only its wait: the item stays queued and is committed with
        # the others (the loop skips answering a cancelled future).
        return await done

    def stop(self) -> None:
        """Take no more items; `run` commits what is pending, then returns."""
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        while True:
            if not self._pending:
                if self._stopping:
                    return
                await self._wake.wait()
                self._wake.clear()
                continue
            batch = self._take()
            try:
                results = await self._commit([item for item, _ in batch])
            except Exception as exc:
                if len(batch) == 1:
                    self._fail(batch[0][1], exc)
                    continue
                log.warning("%s: a commit of %d items failed (%s); committing each alone", self.name, len(batch), exc)
                for item, done in batch:
                    await self._commit_alone(item, done)
                continue
            for (_, done), result in zip(batch, results, strict=True):
                if not done.done():
                    done.set_result(result)

    async def _commit_alone(self, item: T, done: asyncio.Future[R]) -> None:
        try:
            (result,) = await self._commit([item])
        except Exception as exc:
            self._fail(done, exc)
            return
        if not done.done():
            done.set_result(result)

    def _fail(self, done: asyncio.Future[R], exc: Exception) -> None:
        if isinstance(exc, Unavailable):  # the store's database is away: said on /readyz, no traceback to add
            log.warning("%s: a commit failed: %s", self.name, exc.detail)
        else:
            log.error("%s: a commit failed", self.name, exc_info=exc)
        if not done.done():
            done.set_exception(Unavailable(f"{self.name}: the store refused the write: {exc}"))

    def _take(self) -> list[tuple[T, asyncio.Future[R]]]:
        taken, weight = 0, 0
        for item, _ in self._pending:
            weight += self._weight(item)
            if taken and weight > self._max_weight:
                break
            taken += 1
        batch, self._pending = self._pending[:taken], self._pending[taken:]
        return batch
