"""The SDK's default transport (httpx's API over aiohttp's pool) against a real server on a socket."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import uvicorn
from httpx_aiohttp import AiohttpTransport
from starlette.types import ASGIApp, Receive, Scope, Send

from router.client import RouterClient, RouterUnavailable, new_event
from tests.loopback_server import uvicorn_on_loopback

WAIT_S = 10  # bounds a hung test, never a measure of speed


class Stepped:
    """An ASGI app: `/stream` sends one NDJSON line, then the next only once `go_on` is set; `/events`
    answers a publish; `/silent` never answers."""

    def __init__(self) -> None:
        self.go_on = asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        while (await receive()).get("more_body"):
            pass
        if scope["path"] == "/silent":
            await asyncio.Event().wait()
        headers = [(b"content-type", b"application/x-ndjson")]
        if scope["path"] == "/events":
            body = b'{"results":[{"id":"e1","sequence":7,"duplicate":false}]}'
            await send({"type": "http.response.start", "status": 202, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b'{"n":1}\n', "more_body": True})
        await self.go_on.wait()
        await send({"type": "http.response.body", "body": b'{"n":2}\n'})


@asynccontextmanager
async def serving(app: Stepped) -> AsyncIterator[str]:
    # Forced out: the /silent request never ends by itself.
    async with uvicorn_on_loopback(lambda _: plain_config(app), force_exit=True) as port:
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            app.go_on.set()


def plain_config(app: ASGIApp) -> uvicorn.Config:
    return uvicorn.Config(app, lifespan="off", log_level="warning")


async def test_the_default_transport_is_aiohttps() -> None:
    async with RouterClient("http://127.0.0.1:1") as client:
        assert isinstance(client._transport, AiohttpTransport)


async def test_a_streamed_body_arrives_line_by_line_through_the_default_transport() -> None:
    app = Stepped()
    async with serving(app) as url, RouterClient(url) as client:
        async with client._http.stream("GET", url + "/stream") as response:
            lines = response.aiter_lines()
            # The second line is held back until the first has been read: a buffered body would hang here.
            assert await asyncio.wait_for(anext(lines), WAIT_S) == '{"n":1}'
            app.go_on.set()
            assert await asyncio.wait_for(anext(lines), WAIT_S) == '{"n":2}'


async def test_publishing_through_the_default_transport() -> None:
    async with serving(Stepped()) as url, RouterClient(url) as client:
        result = await client.publish(new_event("t", "tests", {"n": 1}, id="e1"))
    assert (result.id, result.sequence, result.duplicate) == ("e1", 7, False)


async def test_a_router_that_does_not_answer_in_time_is_unavailable() -> None:
    async with serving(Stepped()) as url, RouterClient(url, timeout_s=0.2, retries=0) as client:
        with pytest.raises(RouterUnavailable) as failed:
            await client._request("POST", "/silent", json={})
    assert failed.value.status == 503 and "Timeout" in failed.value.problem["detail"]


class Held:
    """An ASGI app answering a publish only once `release` is set, noting each connection a request came on."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.two_in = asyncio.Event()
        self.active = 0
        self.connections: set[tuple[str, int]] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        while (await receive()).get("more_body"):
            pass
        self.connections.add(tuple(scope["client"]))
        self.active += 1
        if self.active >= 2:
            self.two_in.set()
        await self.release.wait()
        self.active -= 1
        body = b'{"results":[{"id":"e1","sequence":7,"duplicate":false}]}'
        await send({"type": "http.response.start", "status": 202, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


async def test_max_connections_bounds_the_default_pool() -> None:
    """Requests beyond `max_connections` wait their turn for a connection rather than open one each (the
    processing service bounds its queue client this way)."""
    app = Held()
    async with uvicorn_on_loopback(lambda _: plain_config(app), force_exit=True) as port:
        try:
            # Publishes that do not share requests (concurrent ones would go in one batch otherwise).
            url = f"http://127.0.0.1:{port}"
            async with RouterClient(url, max_connections=2, coalesce_publishes=False) as client:
                publishes = [asyncio.create_task(client.publish(new_event("t", "s", {}))) for _ in range(5)]
                await asyncio.wait_for(app.two_in.wait(), WAIT_S)
                await asyncio.sleep(0.3)  # room for a third connection to show up if the pool were unbounded
                assert app.active == 2
                app.release.set()
                await asyncio.wait_for(asyncio.gather(*publishes), WAIT_S)
            assert len(app.connections) == 2
        finally:
            app.release.set()  # a failed check leaves no request held
