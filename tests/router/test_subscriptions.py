"""Subscriptions: idempotent PUT, start positions, validation, deletion, pattern tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from router.app import create_app
from router.settings import RouterSettings
from tests.conftest import running
from tests.router.events import BATCH, event

pytestmark = pytest.mark.engines  # CI runs these on PostgreSQL too (scripts/check)


async def put(router: httpx.AsyncClient, name: str, **body: Any) -> httpx.Response:
    body.setdefault("pattern", None)
    body.setdefault("target", {"queue": {}})
    return await router.put(f"/subscriptions/{name}", json=body)


async def test_put_creates_then_is_idempotent(router: httpx.AsyncClient) -> None:
    created = await put(router, "s", pattern={"type": ["a"]})
    assert created.status_code == 201
    body = created.json()
    assert body["name"] == "s" and body["pattern"] == {"type": ["a"]} and body["delivery"]["max_receive_count"] == 5
    again = await put(router, "s", pattern={"type": ["a"]})
    assert again.status_code == 200 and again.json() == body
    changed = await put(router, "s", pattern={"type": ["b"]})
    assert changed.status_code == 200 and changed.json()["pattern"] == {"type": ["b"]}
    assert [s["name"] for s in (await router.get("/subscriptions")).json()["items"]] == ["s"]


async def test_one_subscription_past_the_limit_is_409_naming_it(
    router_settings: Callable[..., RouterSettings],
) -> None:
    app = create_app(router_settings(max_subscriptions=2), exit_on_failure=False)
    async with running(app, base_url="http://router") as client:
        assert [(await put(client, name)).status_code for name in ("a", "b")] == [201, 201]
        refused = await put(client, "c")
        assert refused.status_code == 409 and refused.headers["content-type"] == "application/problem+json"
        assert "CATTUBE_MAX_SUBSCRIPTIONS=2" in refused.json()["detail"]
        assert (await put(client, "b", pattern={"type": ["x"]})).status_code == 200  # a change is no new one
        assert (await client.get("/subscriptions/c")).status_code == 404
        assert (await client.delete("/subscriptions/a")).status_code == 204
        assert (await put(client, "c")).status_code == 201
        assert "409" in (await client.get("/openapi.json")).json()["paths"]["/subscriptions/{name}"]["put"]["responses"]


async def test_push_subscriptions_carry_a_signing_secret(router: httpx.AsyncClient) -> None:
    body = (await put(router, "hook", target={"url": "http://127.0.0.1:1/x"})).json()
    assert body["secret"].startswith("whsec_")
    assert (await router.get("/subscriptions/hook")).json()["secret"] == body["secret"]
    assert (await put(router, "hook", target={"url": "http://127.0.0.1:1/x"})).json()["secret"] == body["secret"]


@pytest.mark.parametrize(
    ("start", "expected"), [("latest", ["new"]), ("earliest", ["old1", "old2", "new"]), (2, ["old2", "new"])]
)
async def test_start_position(router: httpx.AsyncClient, start: Any, expected: list[str]) -> None:
    await router.post("/events", content=json.dumps([event(id="old1"), event(id="old2")]), headers=BATCH)
    await put(router, "s", start=start)
    await router.post("/events", content=json.dumps([event(id="new")]), headers=BATCH)
    messages = (await router.post("/subscriptions/s/receive", json={"max_messages": 10})).json()["messages"]
    assert [m["event"]["id"] for m in messages] == expected


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"pattern": {"type": "not-a-list"}}, "pattern.type"),
        ({"pattern": {"type": [{"bogus-operator": 1}]}}, "pattern.type"),
        ({"pattern": {"n": [{"numeric": [">", "x"]}]}}, "pattern.n"),
        ({"target": {"url": "ftp://x"}}, "body.target.url"),
        ({"target": {}}, "body.target"),
        ({"target": {"queue": {}}, "delivery": {"max_receive_count": 0}}, "body.delivery.max_receive_count"),
        ({"target": {"queue": {}}, "delivery": {"mode": "weird"}}, "body.delivery.mode"),
        ({"start": "yesterday"}, "body.start"),
        ({"unknown": 1}, "body.unknown"),
    ],
)
async def test_invalid_subscriptions_are_refused_naming_the_field(
    router: httpx.AsyncClient, body: dict[str, Any], field: str
) -> None:
    response = await put(router, "bad", **body)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    fields = [e["field"] for e in response.json()["errors"]]
    assert any(f.startswith(field) for f in fields), fields
    assert (await router.get("/subscriptions/bad")).status_code == 404


async def test_a_bad_name_is_refused(router: httpx.AsyncClient) -> None:
    response = await put(router, "-no")
    assert response.status_code == 422 and response.json()["errors"][0]["field"] == "path.name"


async def test_delete_removes_the_subscription_and_its_messages(router: httpx.AsyncClient) -> None:
    await put(router, "s")
    await router.post("/events", content=json.dumps([event()]), headers=BATCH)
    assert (await router.delete("/subscriptions/s")).status_code == 204
    assert (await router.get("/subscriptions/s")).status_code == 404
    assert (await router.delete("/subscriptions/s")).status_code == 404
    await put(router, "s")
    assert (await router.get("/subscriptions/s/stats")).json()["backlog"] == 0


async def test_pattern_test_endpoint(router: httpx.AsyncClient) -> None:
    pattern = {"type": [{"prefix": "cattube.video."}], "data": {"renditions": ["720p"]}}
    hit = {"type": "cattube.video.uploaded", "data": {"renditions": ["1080p", "720p"]}}
    miss = {"type": "cattube.video.uploaded", "data": {"renditions": ["1080p"]}}
    assert (await router.post("/patterns/test", json={"pattern": pattern, "event": hit})).json() == {"match": True}
    assert (await router.post("/patterns/test", json={"pattern": pattern, "event": miss})).json() == {"match": False}
    bad = await router.post("/patterns/test", json={"pattern": {"a": 1}, "event": hit})
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"].startswith("pattern")


def nested_pattern(depth: int) -> dict[str, Any]:
    pattern: dict[str, Any] = {"x": ["y"]}
    for _ in range(depth):
        pattern = {"n": pattern}
    return pattern


@pytest.mark.parametrize(
    ("pattern", "status", "field"),
    [
        (nested_pattern(900), 422, "pattern.n.n.n"),
        ({".".join(["a"] * 1600): ["x"]}, 422, "pattern"),
        ({f"f{i}": ["x" * 40] for i in range(50)}, 413, "pattern"),
    ],
)
async def test_patterns_over_their_limits_are_refused_before_anything_is_stored(
    router: httpx.AsyncClient, pattern: dict[str, Any], status: int, field: str
) -> None:
    response = await put(router, "big", pattern=pattern)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["errors"][0]["field"].startswith(field)
    assert (await router.get("/subscriptions/big")).status_code == 404
    listed = await router.get("/subscriptions")
    assert listed.status_code == 200 and listed.json()["items"] == []
    tested = await router.post("/patterns/test", json={"pattern": pattern, "event": {"x": "y"}})
    assert tested.status_code == status and tested.json()["errors"][0]["field"].startswith(field)
