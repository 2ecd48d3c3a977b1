"""The hot routes (publish, ack, nack, extend) served as plain ASGI endpoints answer exactly as FastAPI's did."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.routing import Route

from router.app import create_app
from router.front import RouterApp
from router.settings import RouterSettings
from tests.conftest import running
from tests.router.events import STRUCTURED, event

pytestmark = pytest.mark.engines  # CI runs these on PostgreSQL too (scripts/check)

BAD_BODIES: list[tuple[str, bytes]] = [
    ("ack", b""),
    ("ack", b"not json"),
    ("ack", b"[1]"),
    ("ack", b"null"),
    ("ack", b"{}"),
    ("ack", b'{"receipts": []}'),
    ("ack", b'{"receipts": "r"}'),
    ("ack", b'{"receipts": [1]}'),
    ("ack", b'{"receipts": [null]}'),
    ("ack", json.dumps({"receipts": ["r"] * 101}).encode()),
    ("ack", b'{"receipts": ["r"], "extra": 1}'),
    ("nack", b'{"receipts": ["r"], "delay_s": -1}'),
    ("nack", b'{"receipts": ["r"], "delay_s": "5"}'),
    ("nack", b'{"receipts": ["r"], "delay_s": 43201}'),
    ("nack", b'{"receipts": ["r"], "delay_s": true}'),
    ("nack", b'{"receipts": ["r"], "delay_s": null}'),
    ("extend", b'{"receipts": ["r"]}'),
    ("extend", b'{"receipts": ["r"], "visibility_timeout_s": -0.5}'),
    ("extend", b'{"receipts": ["r"], "visibility_timeout_s": "5"}'),
    ("extend", b'{"receipts": ["r"], "visibility_timeout_s": 1e9}'),
]
GOOD_BODIES: list[tuple[str, bytes]] = [
    ("ack", b'{"receipts": ["nope"]}'),
    ("nack", b'{"receipts": ["nope"]}'),
    ("nack", b'{"receipts": ["nope"], "delay_s": 2.5}'),
    ("extend", b'{"receipts": ["nope"], "visibility_timeout_s": 0}'),
    ("extend", b'{"receipts": ["nope", "other"], "visibility_timeout_s": 43200}'),
]


def fastapi_only(app: FastAPI) -> FastAPI:
    """The same app without the plain routes, and its front door shut (router/front.py): FastAPI's own
    routes answer every path."""
    app.router.routes[:] = [r for r in app.router.routes if not (type(r) is Route and r.path != "/docs")]
    assert isinstance(app, RouterApp)
    app.front = None
    return app


@pytest.fixture
async def both(
    router_settings: Callable[..., RouterSettings], tmp_path: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    hot = create_app(router_settings(), exit_on_failure=False)
    plain = fastapi_only(create_app(RouterSettings(data_dir=tmp_path / "other"), exit_on_failure=False))
    async with running(hot) as a, running(plain) as b:
        for client in (a, b):
            await client.put("/subscriptions/q", json={"pattern": None, "target": {"queue": {}}})
        yield a, b


def test_the_router_serves_the_hot_routes_as_plain_routes(router_settings: Callable[..., RouterSettings]) -> None:
    app = create_app(router_settings(), exit_on_failure=False)
    plain = {(r.path, *sorted(r.methods or ())) for r in app.router.routes if type(r) is Route}
    for verb in ("ack", "nack", "extend"):
        assert (f"/subscriptions/{{name}}/{verb}", "POST") in plain
    assert ("/events", "POST") in plain


@pytest.mark.parametrize(("verb", "body"), BAD_BODIES + GOOD_BODIES)
async def test_receipt_routes_answer_as_fastapis(
    both: tuple[httpx.AsyncClient, httpx.AsyncClient], verb: str, body: bytes
) -> None:
    hot, plain = both
    headers = {"Content-Type": "application/json"}
    ours = await hot.post(f"/subscriptions/q/{verb}", content=body, headers=headers)
    theirs = await plain.post(f"/subscriptions/q/{verb}", content=body, headers=headers)
    assert (ours.status_code, ours.headers["content-type"]) == (theirs.status_code, theirs.headers["content-type"])
    assert ours.json() == theirs.json()


async def test_receipt_routes_on_a_missing_subscription_answer_as_fastapis(
    both: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    for client in both:
        await client.delete("/subscriptions/q")
    answers = [await c.post("/subscriptions/q/ack", json={"receipts": ["r"]}) for c in both]
    assert answers[0].status_code == answers[1].status_code == 404
    assert answers[0].json() == answers[1].json()


async def test_publish_answers_as_before(both: tuple[httpx.AsyncClient, httpx.AsyncClient]) -> None:
    # One event id per app: on PostgreSQL the two routers share a database.
    accepted = [await c.post("/events", json=event(id=f"p{i}"), headers=STRUCTURED) for i, c in enumerate(both)]
    assert [a.status_code for a in accepted] == [202, 202]
    assert [a.json()["results"][0]["duplicate"] for a in accepted] == [False, False]
    for body in (b"{", b'{"specversion": "0.3"}', b'{"specversion": "1.0", "id": "x", "source": "s", "type": 5}'):
        answers = [await c.post("/events", content=body, headers=STRUCTURED) for c in both]
        assert answers[0].status_code == answers[1].status_code
        assert answers[0].headers["content-type"] == answers[1].headers["content-type"]
        assert answers[0].json() == answers[1].json()


async def test_requests_do_not_ask_opentelemetry_whether_it_is_configured(
    router: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # FastAPI's native telemetry looked up the global providers (reading os.environ) on every request;
    # the router configures none, so it is off from the start.
    from opentelemetry import metrics, trace

    asked: list[str] = []
    for module in (trace, metrics):
        name = "get_tracer_provider" if module is trace else "get_meter_provider"
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda real=real, name=name: asked.append(name) or real())
    assert (await router.post("/events", json=event(id="t1"), headers=STRUCTURED)).status_code == 202
    assert (await router.get("/healthz")).status_code == 200
    assert asked == []
