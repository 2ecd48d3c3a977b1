"""The front door (router/front.py): hot requests skip the middleware stack and are answered exactly as it would.

Each test runs two routers side by side: one as `create_app` makes it (the front serves the hot routes) and
one with the front shut (`app.front = None`: every request through FastAPI's stack, as before), and compares
their answers byte for byte: status, headers and body.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from router.app import create_app
from router.bus import Bus
from router.front import RouterApp
from router.settings import RouterSettings
from services.common.server import uvicorn_config
from tests.loopback_server import uvicorn_on_loopback
from tests.router.events import STRUCTURED, event

pytestmark = pytest.mark.engines  # CI runs these on PostgreSQL too (scripts/check)

ADMIN, SERVICE, USER = "admin-secret", "service-secret", "user-secret"
TOKENS = {"token": ADMIN, "service_token": SERVICE, "user_token": USER}
QUEUE = {"pattern": None, "target": {"queue": {}}}
JSON = {"Content-Type": "application/json"}
Answer = tuple[int, list[tuple[bytes, bytes]], bytes]


def answer(response: httpx.Response) -> Answer:
    return response.status_code, sorted(response.headers.raw), response.content


def shut(app: FastAPI) -> FastAPI:
    """The same router with its front door shut: every request through the middleware stack."""
    assert isinstance(app, RouterApp) and app.front is not None
    app.front = None
    return app


@asynccontextmanager
async def client_of(app: FastAPI, *, raise_app_exceptions: bool = True) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield client


@asynccontextmanager
async def pair(tmp_path: Path, **settings: Any) -> AsyncIterator[tuple[FastAPI, FastAPI]]:
    """A router with its front door and one without, on stores of their own (on PostgreSQL, one shared database)."""
    front = create_app(RouterSettings(data_dir=tmp_path / "front", **settings), exit_on_failure=False)
    stack = shut(create_app(RouterSettings(data_dir=tmp_path / "stack", **settings), exit_on_failure=False))
    yield front, stack


class CountingStack:
    """Wraps an app's built middleware stack and counts the requests that enter it."""

    def __init__(self, app: FastAPI) -> None:
        assert app.middleware_stack is not None
        self.inner: ASGIApp = app.middleware_stack
        self.http = 0
        app.middleware_stack = self

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.http += scope["type"] == "http"
        await self.inner(scope, receive, send)


async def test_hot_requests_do_not_enter_the_middleware_stack(tmp_path: Path) -> None:
    app = create_app(RouterSettings(data_dir=tmp_path / "data", **TOKENS), exit_on_failure=False)
    async with client_of(app) as client:
        service = {"Authorization": f"Bearer {SERVICE}"}
        assert (
            await client.put("/subscriptions/q", json=QUEUE, headers=service)
        ).status_code == 201  # builds the stack
        stack = CountingStack(app)
        for n in range(3):
            published = await client.post("/events", json=event(id=f"f{n}"), headers={**STRUCTURED, **service})
            assert published.status_code == 202
        received = await client.post("/subscriptions/q/receive", json={"max_messages": 3}, headers=service)
        assert stack.http == 1  # receive is not a hot route
        receipts = [m["receipt"] for m in received.json()["messages"]]
        verbs = [("extend", {"visibility_timeout_s": 30}), ("nack", {"delay_s": 0}), ("ack", {})]
        for receipt, (verb, body) in zip(receipts, verbs, strict=True):
            done = await client.post(f"/subscriptions/q/{verb}", json={"receipts": [receipt], **body}, headers=service)
            assert done.json() == {"results": [{"receipt": receipt, "ok": True, "error": None}]}
        assert stack.http == 1
        refused = await client.post("/events", json=event(), headers=STRUCTURED)  # no token: refused by the front
        assert refused.status_code == 401
        assert stack.http == 1
        # A body the plain ack route does not take goes to FastAPI's route, through the stack.
        assert (await client.post("/subscriptions/q/ack", json={"receipts": []}, headers=service)).status_code == 422
        assert stack.http == 2


async def test_every_other_request_answers_as_the_stack(tmp_path: Path) -> None:
    async with pair(tmp_path) as (front_app, stack_app):
        async with client_of(front_app) as front, client_of(stack_app) as stack:
            for client in (front, stack):
                await client.put("/subscriptions/q", json=QUEUE)
            answers: list[tuple[Answer, Answer]] = []
            for method, path in [
                ("GET", "/events"),
                ("POST", "/events/"),
                ("POST", "/subscriptions//ack"),
                ("POST", "/subscriptions/q/ack/"),
                ("POST", "/subscriptions/q/unknown"),
                ("GET", "/subscriptions/q/ack"),
                ("POST", "/subscriptions/a/b/ack"),
                ("DELETE", "/subscriptions/q/stream"),
            ]:
                body = json.dumps(QUEUE).encode() if method != "GET" else None
                ours = await front.request(method, path, content=body, headers=JSON)
                theirs = await stack.request(method, path, content=body, headers=JSON)
                answers.append((answer(ours), answer(theirs)))
            for ours_answer, theirs_answer in answers:
                assert ours_answer == theirs_answer


HOT_REQUESTS = [
    ("/events", STRUCTURED, json.dumps(event(id="auth")).encode()),
    ("/subscriptions/q/ack", JSON, b'{"receipts": ["nope"]}'),
    ("/subscriptions/q/nack", JSON, b'{"receipts": ["nope"], "delay_s": 1}'),
    ("/subscriptions/q/extend", JSON, b'{"receipts": ["nope"], "visibility_timeout_s": 1}'),
    ("/subscriptions/missing/stream", JSON, b"{}"),  # a stream that would start gets 404 instead
    ("/subscriptions/q/stream", JSON, b'{"prefetch": 0}'),
]
AUTHORIZATIONS = [None, "Bearer nope", "Basic admin-secret", "Bearer", f"Bearer {USER}", f"bearer {SERVICE}"]


@pytest.mark.parametrize("authorization", AUTHORIZATIONS)
async def test_tokens_are_checked_as_the_stack_checks_them(tmp_path: Path, authorization: str | None) -> None:
    async with pair(tmp_path, **TOKENS) as (front_app, stack_app):
        async with client_of(front_app) as front, client_of(stack_app) as stack:
            admin = {"Authorization": f"Bearer {ADMIN}"}
            for client in (front, stack):
                await client.put("/subscriptions/q", json=QUEUE, headers=admin)
            given = {"Authorization": authorization} if authorization else {}
            for path, headers, body in HOT_REQUESTS:
                ours = await front.post(path, content=body, headers={**headers, **given})
                theirs = await stack.post(path, content=body, headers={**headers, **given})
                if path == "/events" and ours.status_code == 202:  # accepted by both (sequences may differ)
                    assert theirs.status_code == 202
                    assert ours.headers["content-type"] == theirs.headers["content-type"] == "application/json"
                    continue
                assert answer(ours) == answer(theirs), path
                if authorization in (None, "Bearer nope"):
                    assert ours.status_code == 401 and ours.headers["www-authenticate"] == "Bearer"


async def test_a_service_token_on_an_admins_subscription_is_refused_as_the_stack_refuses_it(tmp_path: Path) -> None:
    async with pair(tmp_path, **TOKENS) as (front_app, stack_app):
        async with client_of(front_app) as front, client_of(stack_app) as stack:
            for client in (front, stack):
                await client.put("/subscriptions/adm", json=QUEUE, headers={"Authorization": f"Bearer {ADMIN}"})
            service = {**JSON, "Authorization": f"Bearer {SERVICE}"}
            for verb in ("ack", "nack", "stream"):
                body = b'{"receipts": ["r"]}' if verb != "stream" else b"{}"
                ours = await front.post(f"/subscriptions/adm/{verb}", content=body, headers=service)
                theirs = await stack.post(f"/subscriptions/adm/{verb}", content=body, headers=service)
                assert ours.status_code == 403
                assert answer(ours) == answer(theirs)


async def chunks(body: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(body), 1000):
        yield body[start : start + 1000]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_body_limits_answer_as_the_stack(tmp_path: Path, chunked: bool) -> None:
    async with pair(tmp_path, max_body_bytes=4000, max_request_bytes=8000, **TOKENS) as (front_app, stack_app):
        async with client_of(front_app) as front, client_of(stack_app) as stack:
            admin = {"Authorization": f"Bearer {ADMIN}"}
            for client in (front, stack):
                await client.put("/subscriptions/q", json=QUEUE, headers=admin)
            receipts = json.dumps({"receipts": ["r" * 50] * 100}).encode()  # over max_body_bytes
            big_event = json.dumps(event(id="big", data={"pad": "x" * 9000})).encode()
            stream = json.dumps({"prefetch": 1, "pad": "x" * 4200}).encode()  # over the stream's own 4096
            cases = [
                ("/subscriptions/q/ack", JSON, receipts),
                ("/subscriptions/q/extend", JSON, receipts),
                ("/events", STRUCTURED, big_event),
                ("/subscriptions/q/stream", JSON, stream),
            ]
            for path, headers, body in cases:
                for given in ({}, admin):  # the bound comes before the token check, except on publish
                    sent = {**headers, **given}
                    ours = await front.post(path, content=chunks(body) if chunked else body, headers=sent)
                    theirs = await stack.post(path, content=chunks(body) if chunked else body, headers=sent)
                    assert answer(ours) == answer(theirs), (path, given)
                    if given or path != "/events":
                        assert ours.status_code == 413, (path, given)


@pytest.mark.parametrize("path", ["/events", "/subscriptions/q/ack", "/subscriptions/q/stream"])
async def test_an_unexpected_error_is_answered_logged_and_raised_as_by_the_stack(
    tmp_path: Path, path: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the store fell over")

    for method in ("publish", "ack", "queue"):
        monkeypatch.setattr(Bus, method, broken)
    bodies = {"/events": json.dumps(event(id="boom")).encode(), "/subscriptions/q/stream": b"{}"}
    body = bodies.get(path, b'{"receipts": ["r"]}')
    headers = STRUCTURED if path == "/events" else JSON
    answers: list[Answer] = []
    logged: list[list[str]] = []
    async with pair(tmp_path) as apps:
        for app in apps:
            async with client_of(app, raise_app_exceptions=False) as client:
                caplog.clear()
                with caplog.at_level(logging.ERROR):
                    answers.append(answer(await client.post(path, content=body, headers=headers)))
                logged.append([r.getMessage() for r in caplog.records])
            async with client_of(app) as client:  # and raised on, for the server to log and close the connection
                with pytest.raises(RuntimeError, match="the store fell over"):
                    await client.post(path, content=body, headers=headers)
    assert answers[0] == answers[1]
    assert answers[0][0] == 500 and json.loads(answers[0][2])["title"] == "Internal error"
    assert logged[0] == logged[1] == [f"unhandled error on POST {path}"]


@asynccontextmanager
async def served(tmp_path: Path, **settings: Any) -> AsyncIterator[int]:
    """The router under uvicorn as `python -m router` runs it (services/common/server.py) on a loopback port."""
    router_settings = RouterSettings(data_dir=tmp_path / "data", log_level="warning", **settings)
    app = create_app(router_settings, exit_on_failure=False)

    def config(port: int) -> uvicorn.Config:
        config = uvicorn_config(app, router_settings, port, lifespan="off")
        assert config.proxy_headers is False  # the app applies them itself, to the requests that reach the stack
        return config

    async with app.router.lifespan_context(app), uvicorn_on_loopback(config) as port:
        yield port


async def exchange(port: int, request: bytes) -> tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20), reader, writer


def publish_request(event_id: str) -> bytes:
    body = json.dumps(event(id=event_id)).encode()
    head = b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Type: application/cloudevents+json\r\n"
    return head + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)


async def test_the_connection_cap_holds_for_hot_requests(tmp_path: Path) -> None:
    """The cap lives in the server's protocol (services/common/connections.py), ahead of the front door."""
    async with served(tmp_path, max_connections=1) as port:
        head, _, first = await exchange(port, publish_request("capped-1"))
        assert head.startswith(b"HTTP/1.1 202")
        head, _, second = await exchange(port, publish_request("capped-2"))
        assert head.startswith(b"HTTP/1.1 503") and b"content-type: application/problem+json" in head
        second.close()
        first.close()


async def test_forwarded_headers_still_reach_the_stack_and_no_server_header_is_sent(tmp_path: Path) -> None:
    async with served(tmp_path) as port:
        # Starlette's redirect to the path without its slash is built from the scope's scheme.
        forwarded = b"GET /subscriptions/ HTTP/1.1\r\nHost: cattube.example\r\nX-Forwarded-Proto: https\r\n\r\n"
        head, _, writer = await exchange(port, forwarded)
        writer.close()
        assert head.startswith(b"HTTP/1.1 307")
        assert b"\r\nlocation: https://cattube.example/subscriptions\r\n" in head
        head, _, writer = await exchange(port, publish_request("forwarded"))
        writer.close()
        assert head.startswith(b"HTTP/1.1 202")
        assert b"\r\nserver:" not in head.lower() and b"\r\ndate:" in head.lower()


def test_the_front_claims_only_the_hot_routes(router_settings: Callable[..., RouterSettings]) -> None:
    app = create_app(router_settings(), exit_on_failure=False)
    assert isinstance(app, RouterApp) and app.front is not None
    claimed = {
        path
        for path in [
            "/events",
            "/events/",
            "/subscriptions/q/ack",
            "/subscriptions/q/nack",
            "/subscriptions/q/extend",
            "/subscriptions/q/stream",
            "/subscriptions/q/receive",
            "/subscriptions//ack",
            "/subscriptions/q/ack/",
            "/subscriptions/a/b/ack",
            "/subscriptions/q",
        ]
        if app.front.match({"path": path}) is not None
    }
    assert claimed == {
        "/events",
        "/subscriptions/q/ack",
        "/subscriptions/q/nack",
        "/subscriptions/q/extend",
        "/subscriptions/q/stream",
    }


@pytest.mark.parametrize("path", ["/events", "/subscriptions/q/ack", "/subscriptions/q/stream"])
async def test_a_client_that_leaves_mid_body_is_let_go_without_an_error(
    tmp_path: Path, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing to answer and nothing wrong on our side: no traceback logged (it was two, at ERROR), nothing sent,
    nothing stored."""
    app = create_app(RouterSettings(data_dir=tmp_path / "data"), exit_on_failure=False)
    scope: Scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"1000")],
        "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 80),
    }  # fmt: skip
    arriving = [{"type": "http.request", "body": b'{"receipts": [', "more_body": True}, {"type": "http.disconnect"}]
    sent: list[Any] = []

    async def receive() -> Any:
        return arriving.pop(0) if arriving else {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)

    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            assert (await client.put("/subscriptions/q", json=QUEUE)).status_code in (200, 201)
            with caplog.at_level(logging.WARNING):
                await app(scope, receive, send)
            stats = (await client.get("/subscriptions/q/stats")).json()
    # Ours, and uvicorn's (asyncio's own records are the store's business: on PostgreSQL a background
    # transaction of the PUT above may be reported there while this runs).
    logged = [r.getMessage() for r in caplog.records if r.name.startswith(("router", "services", "uvicorn"))]
    assert sent == [] and logged == []
    assert (stats["backlog"], stats["in_flight"]) == (0, 0)
