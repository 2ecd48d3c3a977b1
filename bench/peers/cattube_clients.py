"""CatTube through its SDK (`router.client`, httpx) and through raw aiohttp, on a queue subscription.

Publishing is `POST /events` (one event, or a batch of them in one request); the router answers 202
once the events are durable at its setting. The consumer keeps the same window in flight as the
peers' consumers, with the router's streaming receive (`POST /subscriptions/{name}/stream`, prefetch =
the window; NDJSON lines, which the aiohttp client reads itself) and acks batched as the SDK's `Acker`
does (every receipt queued while one ack request is out goes in the next).

`CATTUBE_BENCH_CONSUMER=receive` (in the environment of `python -m bench.peers`) runs the consumer of
before the stream instead, for A/B runs: window ÷ `RECEIVE_MAX` receive → ack loops side by side.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from bench.peers.tally import Tally
from router.client import RouterClient

RECEIVE_MAX = 10  # what the receive loops take per receive (the router's cap was 10 before the stream)
STREAMING = os.environ.get("CATTUBE_BENCH_CONSUMER", "stream") != "receive"
WAIT_S = 5
VISIBILITY_S = 60  # far longer than any message stays unacked here: no redelivery muddles the count


def _loops(window: int) -> int:
    return max(1, window // RECEIVE_MAX)


def _subscription(name: str) -> dict[str, Any]:
    return {"pattern": {"source": [f"bench/{name}"]}, "target": {"queue": {}}}


async def _run_loops(count: int, loop: Any) -> None:
    async with asyncio.TaskGroup() as group:
        for _ in range(count):
            group.create_task(loop())


class SdkClient:
    def __init__(self, url: str, name: str, window: int) -> None:
        self.url, self.name, self.window = url, name, window

    async def connect(self) -> None:
        self.router = RouterClient(self.url)

    async def close(self) -> None:
        await self.router.aclose()

    async def declare(self) -> None:
        spec = _subscription(self.name)
        await self.router.ensure_subscription(self.name, pattern=spec["pattern"], target=spec["target"])

    async def publish(self, events: list[dict[str, Any]]) -> None:
        if len(events) == 1:
            await self.router.publish(events[0])
        else:
            await self.router.publish_batch(events)

    async def consume(self, tally: Tally) -> None:
        queue = self.router.queue(self.name)
        if STREAMING:
            async with queue.stream(prefetch=self.window, visibility_timeout_s=VISIBILITY_S) as stream:
                async for message in stream:
                    number = tally.delivered(message.event)
                    stream.ack(message).add_done_callback(functools.partial(_acked, tally, number))
            return

        async def loop() -> None:
            while not tally.done.is_set():
                messages = await queue.receive(
                    max_messages=RECEIVE_MAX, wait_s=WAIT_S, visibility_timeout_s=VISIBILITY_S
                )
                if messages:
                    numbers = [tally.delivered(m.event) for m in messages]
                    await queue.ack([m.receipt for m in messages])
                    tally.acked(numbers)

        await _run_loops(_loops(self.window), loop)

    async def remove(self) -> None:
        await self.router.delete_subscription(self.name)


def _acked(tally: Tally, number: int, _: asyncio.Future[bool]) -> None:
    tally.acked([number])


class AiohttpClient:
    SINGLE = {"Content-Type": "application/cloudevents+json"}
    BATCH = {"Content-Type": "application/cloudevents-batch+json"}

    def __init__(self, url: str, name: str, window: int) -> None:
        self.url, self.name, self.window = url, name, window
        self.base = f"{url}/subscriptions/{name}"

    async def connect(self) -> None:
        self.session = aiohttp.ClientSession()

    async def close(self) -> None:
        await self.session.close()

    async def _call(self, method: str, url: str, **kwargs: Any) -> Any:
        async with self.session.request(method, url, **kwargs) as response:
            if response.status >= 300:
                raise RuntimeError(f"{method} {url}: {response.status} {await response.text()}")
            return None if response.status == 204 else await response.json()

    async def declare(self) -> None:
        await self._call("PUT", self.base, json=_subscription(self.name))

    async def publish(self, events: list[dict[str, Any]]) -> None:
        if len(events) == 1:
            await self._call("POST", f"{self.url}/events", data=json.dumps(events[0]), headers=self.SINGLE)
        else:
            await self._call("POST", f"{self.url}/events", data=json.dumps(events), headers=self.BATCH)

    async def consume(self, tally: Tally) -> None:
        if STREAMING:
            await self._stream(tally)
            return
        receive = {"max_messages": RECEIVE_MAX, "wait_s": WAIT_S, "visibility_timeout_s": VISIBILITY_S}

        async def loop() -> None:
            while not tally.done.is_set():
                messages = (await self._call("POST", f"{self.base}/receive", json=receive))["messages"]
                if messages:
                    numbers = [tally.delivered(m["event"]) for m in messages]
                    receipts = [m["receipt"] for m in messages]
                    await self._call("POST", f"{self.base}/ack", json={"receipts": receipts})
                    tally.acked(numbers)

        await _run_loops(_loops(self.window), loop)

    async def _stream(self, tally: Tally) -> None:
        acks = BatchedAcks(lambda receipts: self._call("POST", f"{self.base}/ack", json={"receipts": receipts}))
        body = {"prefetch": self.window, "visibility_timeout_s": VISIBILITY_S}
        timeout = aiohttp.ClientTimeout(total=None, sock_read=60)  # heartbeats every 15 s
        async with self.session.post(f"{self.base}/stream", json=body, timeout=timeout) as response:
            if response.status != 200:
                raise RuntimeError(f"stream: {response.status} {await response.text()}")
            async for line in response.content:  # aiohttp's reader yields one line at a time
                message = json.loads(line)
                if "receipt" in message:
                    acks.add(message["receipt"], tally.delivered(message["event"]), tally)

    async def remove(self) -> None:
        await self._call("DELETE", self.base)


class BatchedAcks:
    """Every receipt queued while one ack request is out goes in the next (at most 100 per request)."""

    def __init__(self, send: Callable[[list[str]], Awaitable[Any]]) -> None:
        self.send = send
        self.pending: list[tuple[str, int]] = []
        self.sender: asyncio.Task[None] | None = None

    def add(self, receipt: str, number: int, tally: Tally) -> None:
        self.pending.append((receipt, number))
        if self.sender is None or self.sender.done():
            self.sender = asyncio.get_running_loop().create_task(self._send_all(tally))

    async def _send_all(self, tally: Tally) -> None:
        while self.pending:
            batch, self.pending = self.pending[:100], self.pending[100:]
            await self.send([receipt for receipt, _ in batch])
            tally.acked([number for _, number in batch])
