"""A real HTTP receiver on a loopback port for push-delivery tests, with a scriptable answer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from tests.process import free_port


@dataclass
class Delivery:
    at: float
    headers: dict[str, str]
    body: bytes


Answer = Callable[[Delivery, int], Awaitable[web.Response]]
"""Given the delivery and how many came before it, what to answer."""


async def accept(delivery: Delivery, count: int) -> web.Response:
    return web.Response(status=204)


class Receiver:
    def __init__(self, answer: Answer = accept, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.answer = answer
        self.host = host
        self.port = port or free_port()
        self.deliveries: list[Delivery] = []
        self.arrived = asyncio.Condition()
        self.released = asyncio.Event()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/hook"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()

    async def hang(self) -> None:
        """For an answer that never comes: waits until the receiver stops."""
        await self.released.wait()

    async def stop(self) -> None:
        self.released.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        delivery = Delivery(time.monotonic(), dict(request.headers), await request.read())
        count = len(self.deliveries)
        self.deliveries.append(delivery)
        async with self.arrived:
            self.arrived.notify_all()
        return await self.answer(delivery, count)

    async def wait_for(self, count: int, timeout_s: float = 20) -> list[Delivery]:
        """Wait (on a condition, not a poll) until `count` deliveries have arrived."""
        async with asyncio.timeout(timeout_s), self.arrived:
            await self.arrived.wait_for(lambda: len(self.deliveries) >= count)
        return self.deliveries
