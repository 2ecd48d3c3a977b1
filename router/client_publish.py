"""Single publishes made at the same time share requests, as a NATS client's writes or a Kafka producer's
records do: `RouterClient.publish` hands its event to a `PublishCoalescer`, which keeps one request out at a
time and sends every event queued meanwhile in the next, as one batch (`POST /events`, a CloudEvents batch).

One publish at a time is sent alone at once, as before: nothing waits for company (no linger timer). Under
concurrency a request carries what queued while the previous one was out, so 16 publishers cost about one
request per round trip instead of 16 (bench/README.md, against NATS, Redis and RabbitMQ).

A batch is all-or-nothing at the router. So that a bad event never fails the events it happened to travel
with, a batch the router refuses (4xx: a malformed event, one too large) is sent again event by event, each
publish getting its own answer; a retryable failure (a 503, no connection) is retried as the whole batch by
the client's usual backoff and failover, which is safe since the router stores an event's source + id once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from router.client_values import RouterError

log = logging.getLogger(__name__)

EVENT_REFUSALS = frozenset({400, 413, 422})
"""Refusals that may be one event's doing (malformed, too large, invalid); others (a bad token) fail them all."""

Send = Callable[[bytes], Awaitable[list[dict[str, Any]]]]
"""Send a JSON array of encoded events as one batch; the router's results, in order."""


class PublishCoalescer:
    MAX_EVENTS = 100
    MAX_BYTES = 256 * 1024  # far below the router's default request bound (16 MiB); a 413 is split anyway

    def __init__(self, send: Send) -> None:
        self._send = send
        self._pending: list[tuple[bytes, asyncio.Future[dict[str, Any]]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def publish(self, encoded: bytes) -> dict[str, Any]:
        """Queue one encoded event and return its result once the request carrying it is answered."""
        loop = asyncio.get_running_loop()
        result: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._pending.append((encoded, result))
        if self._sender is None or self._sender.done():
            self._sender = loop.create_task(self._send_all(), name="router-publish")
        # A caller cancelled here cancels `result`: an event not sent yet is then left out.
        return await result

    def _next_batch(self) -> list[tuple[bytes, asyncio.Future[dict[str, Any]]]]:
        batch: list[tuple[bytes, asyncio.Future[dict[str, Any]]]] = []
        size = 0
        while self._pending and len(batch) < self.MAX_EVENTS:
            encoded, result = self._pending[0]
            if batch and size + len(encoded) > self.MAX_BYTES:
                break
            del self._pending[0]
            if not result.done():  # cancelled before it left
                batch.append((encoded, result))
                size += len(encoded) + 1
        return batch

    async def _send_all(self) -> None:
        while self._pending:
            batch = self._next_batch()
            if batch:
                await self._send_batch(batch)

    async def _send_batch(self, batch: list[tuple[bytes, asyncio.Future[dict[str, Any]]]]) -> None:
        try:
            results = await self._send(b"[" + b",".join(encoded for encoded, _ in batch) + b"]")
        except RouterError as exc:
            if len(batch) > 1 and exc.status in EVENT_REFUSALS:  # one bad event: each goes again, alone
                log.debug("a batch of %d publishes was refused (%s); sending each alone", len(batch), exc)
                for one in batch:
                    await self._send_batch([one])
                return
            for _, result in batch:
                _settle(result, exc)
            return
        except BaseException as exc:
            for _, result in batch:
                _settle(result, exc if isinstance(exc, Exception) else RuntimeError("the publish was interrupted"))
            if not isinstance(exc, Exception):
                raise
            return
        if len(results) != len(batch):  # never from a router; a caller must not wait forever for it either
            mismatch = RuntimeError(f"the router answered {len(results)} results for {len(batch)} events")
            for _, result in batch:
                _settle(result, mismatch)
            return
        for (_, result), answer in zip(batch, results, strict=True):
            _settle(result, answer)

    async def aclose(self) -> None:
        """Stop sending: publishes still queued or out fail (the client is closing)."""
        if self._sender is not None and not self._sender.done():
            self._sender.cancel()
            await asyncio.gather(self._sender, return_exceptions=True)
        for _, result in self._pending:
            _settle(result, RuntimeError("the router client was closed before this event was sent"))
        self._pending.clear()


def _settle(result: asyncio.Future[dict[str, Any]], outcome: dict[str, Any] | BaseException) -> None:
    if result.done():  # its caller was cancelled meanwhile
        return
    if isinstance(outcome, BaseException):
        result.set_exception(outcome)
    else:
        result.set_result(outcome)
