"""The consumer side of a queue subscription: receive / ack / nack / extend (SQS semantics), and the
streaming receive with its batching acker. Made by `RouterClient.queue(name)` (router.client, which
re-exports these)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

import httpx

from router.client_values import (
    RETRYABLE_STATUS,
    ReceivedMessage,
    RouterError,
    full_jitter,
    json_body,
    problem_of,
    unreachable_problem,
)

if TYPE_CHECKING:
    from router.client import RouterClient

log = logging.getLogger(__name__)


class QueueConsumer:
    """Receive, ack, nack and extend messages of one queue subscription (SQS semantics)."""

    def __init__(self, client: RouterClient, name: str) -> None:
        self.client = client
        self.name = name

    async def receive(
        self, *, max_messages: int = 1, wait_s: float = 20, visibility_timeout_s: float = 30
    ) -> list[ReceivedMessage]:
        """Long-poll for up to `max_messages`; each is hidden from other consumers for `visibility_timeout_s`."""
        body = {"max_messages": max_messages, "wait_s": wait_s, "visibility_timeout_s": visibility_timeout_s}
        response = await self.client._request("POST", f"/subscriptions/{self.name}/receive", json=body)
        return [
            ReceivedMessage(m["receipt"], m["attempt"], m["sequence"], m["event"])
            for m in json_body(response)["messages"]
        ]

    async def ack(self, receipts: Sequence[str]) -> list[dict[str, Any]]:
        """Delete messages whose work is done. Returns one `{receipt, ok, error}` per receipt."""
        return await self._change("ack", {"receipts": list(receipts)})

    async def nack(self, receipts: Sequence[str], *, delay_s: float = 0) -> list[dict[str, Any]]:
        """Give messages back, to be received again after `delay_s`."""
        return await self._change("nack", {"receipts": list(receipts), "delay_s": delay_s})

    async def extend(self, receipts: Sequence[str], *, visibility_timeout_s: float) -> list[dict[str, Any]]:
        """Keep messages hidden `visibility_timeout_s` longer from now (a heartbeat for long jobs)."""
        return await self._change("extend", {"receipts": list(receipts), "visibility_timeout_s": visibility_timeout_s})

    async def _change(self, verb: str, body: dict[str, Any]) -> list[dict[str, Any]]:
        response = await self.client._request("POST", f"/subscriptions/{self.name}/{verb}", retry=True, json=body)
        results: list[dict[str, Any]] = json_body(response)["results"]
        return results

    def stream(
        self, *, prefetch: int = 100, visibility_timeout_s: float = 30, heartbeat_s: float = 15
    ) -> MessageStream:
        """Messages over one long response, at most `prefetch` of them received and not yet acked or nacked
        (the router's `POST /subscriptions/{name}/stream`); reconnects with backoff. Ack with `stream.ack`,
        batched: every receipt queued while one ack request is out goes in the next, sent as soon as it returns.

            async with queue.stream(prefetch=100) as messages:
                async for message in messages:
                    ...
                    messages.ack(message)
        """
        return MessageStream(self, prefetch, visibility_timeout_s, heartbeat_s)

    def acker(self) -> Acker:
        """Batched acks for this queue (see `Acker`)."""
        return Acker(self)


class Acker:
    """Acks many receipts per request: `ack()` queues a receipt and returns at once; one request at a time is
    out, and it carries every receipt queued before it left (up to `MAX_RECEIPTS` each). No timer: under load
    acks batch themselves, by how long the previous request took. `flush()` waits for what is queued."""

    MAX_RECEIPTS = 100  # the router's limit per ack request

    def __init__(self, queue: QueueConsumer) -> None:
        self.queue = queue
        self._pending: list[tuple[str, asyncio.Future[bool]]] = []
        self._sender: asyncio.Task[None] | None = None
        self.failed = 0
        """Receipts whose ack did not reach the router (their messages come back after their visibility timeout)."""

    def ack(self, receipt: str | ReceivedMessage) -> asyncio.Future[bool]:
        """Queue an ack; the future (which may be ignored) says, once it is sent, whether the router took it."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bool] = loop.create_future()
        self._pending.append((receipt.receipt if isinstance(receipt, ReceivedMessage) else receipt, done))
        if self._sender is None or self._sender.done():
            self._sender = loop.create_task(self._send_all())
        return done

    async def _send_all(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[: self.MAX_RECEIPTS], self._pending[self.MAX_RECEIPTS :]
            try:
                results = await self.queue.ack([receipt for receipt, _ in batch])
            except RouterError as exc:  # retried already; the messages come back after their visibility timeout
                self.failed += len(batch)
                log.warning("acks of %d messages of %r failed (%s)", len(batch), self.queue.name, exc)
                results = [{"ok": False, "receipt": receipt, "error": str(exc)} for receipt, _ in batch]
            for (_, done), result in zip(batch, results, strict=True):
                if not result["ok"]:
                    log.info("ack of %s on %r refused: %s", result["receipt"], self.queue.name, result["error"])
                if not done.done():
                    done.set_result(bool(result["ok"]))

    async def flush(self) -> None:
        """Return once every receipt queued so far has been sent."""
        while self._sender is not None and not self._sender.done():
            await asyncio.shield(self._sender)

    async def aclose(self) -> None:
        await self.flush()


class MessageStream:
    """An async iterator of the messages of one queue, over the router's streaming receive (see
    `QueueConsumer.stream`). It reconnects with backoff when the response ends or fails (the router
    restarting, a network hiccup); messages received before keep their receipts, so acks still count.
    A refusal (no such queue, a bad argument) raises `RouterError`."""

    def __init__(self, queue: QueueConsumer, prefetch: int, visibility_timeout_s: float, heartbeat_s: float) -> None:
        self.queue = queue
        self.acker = Acker(queue)
        self._body = {"prefetch": prefetch, "visibility_timeout_s": visibility_timeout_s, "heartbeat_s": heartbeat_s}
        self._lines: AsyncIterator[str] | None = None
        self._response: httpx.Response | None = None
        self._failures = 0

    def ack(self, message: ReceivedMessage | str) -> asyncio.Future[bool]:
        """Queue an ack (batched, see `Acker`); frees the message's slot in the window once it is sent."""
        return self.acker.ack(message)

    async def nack(self, message: ReceivedMessage | str, *, delay_s: float = 0) -> None:
        receipt = message.receipt if isinstance(message, ReceivedMessage) else message
        await self.queue.nack([receipt], delay_s=delay_s)

    def __aiter__(self) -> MessageStream:
        return self

    async def __anext__(self) -> ReceivedMessage:
        while True:
            if self._lines is None:
                await self._connect()
            assert self._lines is not None
            try:
                line = await anext(self._lines)
            except StopAsyncIteration:
                await self._disconnect("the router ended the stream")
                continue
            except httpx.TransportError as exc:  # read timeout (no heartbeat), reset connection
                await self._disconnect(f"{type(exc).__name__}: {exc}")
                continue
            if not line:
                continue
            self._failures = 0
            item = json.loads(line)
            if "receipt" in item:
                return ReceivedMessage(item["receipt"], item["attempt"], item["sequence"], item["event"])
            if "error" in item:
                await self._disconnect(item["error"])

    async def _connect(self) -> None:
        client = self.queue.client
        path = f"/subscriptions/{self.queue.name}/stream"
        while True:
            if self._failures:
                await asyncio.sleep(full_jitter(self._failures, client.backoff_initial_s, client.backoff_max_s))
            index = client._current
            request = client._http.build_request("POST", client.base_urls[index] + path, json=self._body)
            try:
                response = await client._http.send(request, stream=True)
            except httpx.TransportError as exc:
                problem, status = unreachable_problem(exc), 503
            else:
                if response.status_code < 400:
                    self._response = response
                    self._lines = response.aiter_lines()
                    return
                await response.aread()
                await response.aclose()
                problem, status = problem_of(response), response.status_code
                if status not in RETRYABLE_STATUS:
                    raise RouterError(status, problem)
            self._failures += 1
            if status == 503:
                client._move_on(index)
            log.warning("stream of %r: %s; connecting again", self.queue.name, problem.get("detail"))

    async def _disconnect(self, why: str) -> None:
        log.info("stream of %r ended (%s); connecting again", self.queue.name, why)
        self._failures += 1
        await self._close_response()

    async def _close_response(self) -> None:
        if self._response is not None:
            await self._response.aclose()
        self._response = self._lines = None

    async def aclose(self) -> None:
        """Hang up (the router gives back what it had leased and not yet sent) and send the queued acks."""
        await self._close_response()
        await self.acker.flush()

    async def __aenter__(self) -> MessageStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
