"""What one client can make a service hold: header size and time, open connections, body size.

The connection limits live in the HTTP protocol, so these tests run a real uvicorn server (with
the services' own options, `server_options`) on a loopback socket and talk to it with raw sockets.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, cast

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request

from router.settings import RouterSettings
from services.common.connections import RefusalLog
from services.common.server import server_options
from services.common.settings import CommonSettings
from tests.loopback_server import uvicorn_on_loopback

READ_TIMEOUT_S = 20  # a server without the limit never answers: the test fails instead of hanging


def tiny_app() -> FastAPI:
    app = FastAPI()

    @app.get("/ok")
    async def ok() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        return {"bytes": len(await request.body())}

    return app


@asynccontextmanager
async def serving(app: FastAPI, **limits: Any) -> AsyncIterator[int]:
    """A real uvicorn server with the services' options on a socket bound (and listening) before it starts,
    so clients can connect at once: the backlog holds them until the server accepts."""

    def config(port: int) -> uvicorn.Config:
        options = server_options(CommonSettings(log_level="warning", **limits), port)
        return uvicorn.Config(app, lifespan="off", **options)

    async with uvicorn_on_loopback(config, backlog=128) as port:
        yield port


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length: status, headers, body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines if line)
    headers = {k.lower(): v for k, v in headers.items()}
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), READ_TIMEOUT_S)
    return int(status_line.split()[1]), headers, body


async def closed(reader: asyncio.StreamReader) -> bool:
    return await asyncio.wait_for(reader.read(), READ_TIMEOUT_S) == b""


async def test_oversized_headers_get_431_and_the_connection_closes() -> None:
    async with serving(tiny_app(), max_header_bytes=8 * 1024) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\nX-Big: ")
        # Never finished: the server must stop reading after the limit rather than buffer the lot.
        for _ in range(64):
            writer.write(b"a" * 4096)
        await writer.drain()
        status, headers, body = await read_response(reader)
        assert status == 431
        assert headers["content-type"] == "application/problem+json"
        assert json.loads(body)["status"] == 431
        assert await closed(reader)
        writer.close()


@pytest.mark.parametrize("keep_alive", [False, True], ids=["first-request", "after-a-request"])
async def test_oversized_headers_that_arrive_whole_in_one_read_get_431(keep_alive: bool) -> None:
    """Headers complete within one read are parsed before a count after the read could see them: 9 KiB of
    headers against an 8 KiB limit, in one write, were answered 200."""
    async with serving(tiny_app(), max_header_bytes=8 * 1024) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        if keep_alive:
            writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await read_response(reader))[0] == 200
        writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9 * 1024 + b"\r\n\r\n")
        status, headers, body = await read_response(reader)
        assert status == 431 and headers["content-type"] == "application/problem+json"
        assert json.loads(body)["detail"] == "the request line and headers exceed 8192 bytes"
        assert await closed(reader)
        writer.close()


async def test_headers_within_the_limit_are_served() -> None:
    async with serving(tiny_app(), max_header_bytes=8 * 1024) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        # Sent in one write with a body-less request right behind: nothing of it counts against the next.
        request = b"GET /ok HTTP/1.1\r\nHost: x\r\nX-Fill: " + b"a" * 6000 + b"\r\n\r\n"
        writer.write(request * 3)
        for _ in range(3):
            status, _, body = await read_response(reader)
            assert status == 200 and json.loads(body) == {"status": "ok"}
        writer.close()


async def timed_out(reader: asyncio.StreamReader, naming: str) -> None:
    """The answer is 408 problem+json whose detail names `naming` (what did not arrive), then the connection closes."""
    status, headers, body = await read_response(reader)
    assert status == 408 and headers["content-type"] == "application/problem+json"
    assert naming in json.loads(body)["detail"]
    assert await closed(reader)


@pytest.mark.parametrize("sent", [b"GET /ok HTTP/1.1\r\n", b"GET /ok HTTP/1.1\r\nHost: x\r\nX-Slow: a", b""])
async def test_a_request_whose_headers_never_end_gets_408_and_is_closed(sent: bytes) -> None:
    async with serving(tiny_app(), header_timeout_s=0.5) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(sent)
        await writer.drain()
        await timed_out(reader, naming="headers")
        writer.close()


async def test_the_header_timer_starts_again_for_each_request_on_a_kept_alive_connection() -> None:
    async with serving(tiny_app(), header_timeout_s=0.5) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(reader))[0] == 200
        writer.write(b"GET /ok HTTP/1.1\r\n")  # the second request stalls
        assert (await read_response(reader))[0] == 408
        assert await closed(reader)
        writer.close()


@pytest.mark.parametrize("sent", [b"", b"{"], ids=["no-body-byte", "one-body-byte"])
async def test_a_request_whose_body_stalls_gets_408_and_is_closed(sent: bytes) -> None:
    """Headers in time and then a body that never comes held the connection for good: without a token (bodies are
    bounded before tokens are checked), enough of them made every other client get 503 from the connection cap."""
    async with serving(tiny_app(), body_timeout_s=0.5) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + sent)
        await writer.drain()
        await timed_out(reader, naming="body")
        writer.close()


async def test_a_body_that_arrives_is_served() -> None:
    async with serving(tiny_app(), body_timeout_s=0.5) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n{")
        await writer.drain()
        writer.write(b"}}")
        status, _, body = await read_response(reader)
        assert status == 200 and json.loads(body) == {"bytes": 3}
        writer.close()


async def test_connections_beyond_the_cap_get_503_problem_json(caplog: pytest.LogCaptureFixture) -> None:
    async with serving(tiny_app(), max_connections=2) as port:
        held = []
        for _ in range(2):  # two connections served, and kept open
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await read_response(reader))[0] == 200
            held.append((reader, writer))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = await read_response(reader)
        assert status == 503 and headers["content-type"] == "application/problem+json"
        assert headers["connection"] == "close" and "retry-after" in headers
        assert json.loads(body)["status"] == 503
        assert await closed(reader)
        writer.close()
        with caplog.at_level(logging.WARNING, logger="services.common.connections"):
            for _ in range(20):  # a flood of refusals is one line, not twenty (the period is 10 s)
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
                assert (await read_response(reader))[0] == 503
                writer.close()
        assert len([r for r in caplog.records if "open connections" in r.getMessage()]) <= 1
        for _, held_writer in held:
            held_writer.close()


def test_refusals_are_logged_once_then_counted_once_per_period(caplog: pytest.LogCaptureFixture) -> None:
    """Driven by hand: the period's timer is fired by the test, so no wall-clock wait decides anything."""
    timers: list[tuple[Any, tuple[Any, ...]]] = []

    class Loop:
        def call_later(self, delay: float, callback: Any, *args: Any) -> object:
            timers.append((callback, args))
            return object()  # a handle: the log holds it while its period runs

    refusals, loop = RefusalLog(every_s=10), cast(asyncio.AbstractEventLoop, Loop())
    with caplog.at_level(logging.WARNING, logger="services.common.connections"):
        for _ in range(5):
            refusals.refused(loop, 2)
        assert [r.getMessage() for r in caplog.records] == ["over 2 open connections: answering 503"]
        callback, args = timers.pop()
        callback(*args)  # the period ends: the other four are told, and a new period starts
        assert (
            caplog.records[-1].getMessage()
            == "over 2 open connections: answered 503 to 4 more request(s) in the last 10 s"
        )
        callback, args = timers.pop()
        callback(*args)  # a quiet period: nothing to tell, and the next refusal is logged at once
        assert len(caplog.records) == 2 and timers == []
        refusals.refused(loop, 2)
        assert caplog.records[-1].getMessage() == "over 2 open connections: answering 503"


# -- request bodies ---------------------------------------------------------------------------------


JSON = {"content-type": "application/json"}
SUBSCRIPTION = {"pattern": None, "target": {"queue": {}}}


def big_subscription(size: int) -> bytes:
    return json.dumps({**SUBSCRIPTION, "pattern": {"type": ["a" * size]}}).encode()


async def chunks(body: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(body), 65536):
        yield body[start : start + 65536]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_2_mb_json_body_gets_413_and_nothing_is_stored(router: httpx.AsyncClient, chunked: bool) -> None:
    body = big_subscription(2 * 1024 * 1024)
    content = chunks(body) if chunked else body
    response = await router.put("/subscriptions/big", content=content, headers=JSON)
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"
    expected = "at most 1048576 bytes" + ("" if chunked else f", got {len(body)}")
    assert response.json()["errors"] == [{"field": "body", "expected": expected}]
    assert (await router.get("/subscriptions/big")).status_code == 404


async def test_any_content_type_is_bounded_not_only_json(router: httpx.AsyncClient) -> None:
    body = big_subscription(2 * 1024 * 1024)
    response = await router.put("/subscriptions/big", content=body, headers={"content-type": "text/plain"})
    assert response.status_code == 413


async def test_bodies_within_the_limit_still_work(router: httpx.AsyncClient) -> None:
    response = await router.put("/subscriptions/small", content=big_subscription(1000), headers=JSON)
    assert response.status_code == 201, response.text


async def test_publish_keeps_its_own_larger_bound(router_settings: Callable[..., RouterSettings]) -> None:
    from router.app import create_app
    from tests.conftest import running
    from tests.router.events import BATCH, event

    app = create_app(router_settings(max_body_bytes=1024), exit_on_failure=False)
    async with running(app) as client:
        events = [event(id=str(i), data={"pad": "x" * 1000}) for i in range(5)]
        response = await client.post("/events", content=json.dumps(events), headers=BATCH)
        assert response.status_code == 202, response.text
