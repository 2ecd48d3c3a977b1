"""Scoped tokens on the router: what a user, a service and the admin token may do (docs/decisions.md)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from router.app import create_app
from router.settings import RouterSettings
from tests.conftest import running
from tests.router.events import event

ADMIN, SERVICE, USER = "admin-secret", "service-secret", "user-secret"
STRUCTURED = {"Content-Type": "application/cloudevents+json"}
QUEUE = {"pattern": None, "target": {"queue": {}}}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def router(router_settings: Callable[..., RouterSettings]) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(router_settings(token=ADMIN, service_token=SERVICE, user_token=USER), exit_on_failure=False)
    async with running(app) as client:
        yield client


@pytest.mark.parametrize(
    "header", ["bearer admin-secret", "BEARER admin-secret", "Bearer   admin-secret", "beArer admin-secret"]
)
async def test_the_scheme_is_case_insensitive(router: httpx.AsyncClient, header: str) -> None:
    response = await router.post("/events", json=event(), headers={**STRUCTURED, "Authorization": header})
    assert response.status_code == 202


@pytest.mark.parametrize("header", [None, "Bearer nope", "Basic admin-secret", "Bearer", "admin-secret"])
async def test_a_missing_or_unknown_token_is_401(router: httpx.AsyncClient, header: str | None) -> None:
    headers = {**STRUCTURED, **({"Authorization": header} if header else {})}
    response = await router.post("/events", json=event(), headers=headers)
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["www-authenticate"] == "Bearer"


async def test_the_user_token_may_not_touch_the_router(router: httpx.AsyncClient) -> None:
    attempts = [
        router.post("/events", json=event(), headers={**STRUCTURED, **bearer(USER)}),
        router.put("/subscriptions/mine", json=QUEUE, headers=bearer(USER)),
        router.put("/subscriptions/hook", json={"target": {"url": "http://127.0.0.1:9/x"}}, headers=bearer(USER)),
        router.get("/subscriptions/mine/stats", headers=bearer(USER)),
    ]
    for attempt in attempts:
        response = await attempt
        assert response.status_code == 403, response.request.url
        problem = response.json()
        assert response.headers["content-type"] == "application/problem+json"
        assert problem["scope"] == "service" and "service scope" in problem["detail"]
        assert problem["errors"] == [{"field": "header.Authorization", "expected": "Bearer <CATTUBE_SERVICE_TOKEN>"}]
        assert 'error="insufficient_scope"' in response.headers["www-authenticate"]


async def test_the_service_token_publishes_and_works_its_queue(router: httpx.AsyncClient) -> None:
    assert (await router.put("/subscriptions/jobs", json=QUEUE, headers=bearer(SERVICE))).status_code == 201
    published = await router.post("/events", json=event(), headers={**STRUCTURED, **bearer(SERVICE)})
    assert published.status_code == 202
    received = await router.post("/subscriptions/jobs/receive", json={"wait_s": 0}, headers=bearer(SERVICE))
    [message] = received.json()["messages"]
    acked = await router.post(
        "/subscriptions/jobs/ack", json={"receipts": [message["receipt"]]}, headers=bearer(SERVICE)
    )
    assert acked.json()["results"][0]["ok"] is True
    assert (await router.get("/subscriptions/jobs/stats", headers=bearer(SERVICE))).status_code == 200
    assert (await router.get("/subscriptions/jobs", headers=bearer(SERVICE))).json()["owner"] == "service"
    assert (await router.get("/metrics", headers=bearer(SERVICE))).status_code == 200


async def test_the_service_token_may_not_manage_the_router(router: httpx.AsyncClient) -> None:
    await router.put("/subscriptions/jobs", json=QUEUE, headers=bearer(SERVICE))
    refused = [
        router.delete("/subscriptions/jobs/dead-letters", headers=bearer(SERVICE)),
        router.post("/subscriptions/jobs/dead-letters/redrive", headers=bearer(SERVICE)),
        router.get("/subscriptions/jobs/dead-letters", headers=bearer(SERVICE)),
        router.post("/subscriptions/jobs/replay", json={"from": 0}, headers=bearer(SERVICE)),
        router.get("/subscriptions", headers=bearer(SERVICE)),
    ]
    for attempt in refused:
        response = await attempt
        assert response.status_code == 403, response.request.url
        assert response.json()["scope"] == "admin"


async def test_a_service_token_cannot_reach_the_admins_subscriptions(router: httpx.AsyncClient) -> None:
    created = await router.put("/subscriptions/audit", json=QUEUE, headers=bearer(ADMIN))
    assert created.status_code == 201 and created.json()["owner"] == "admin"
    hook = {"target": {"url": "http://127.0.0.1:9/steal"}}
    refused = [
        router.put("/subscriptions/audit", json=hook, headers=bearer(SERVICE)),
        router.delete("/subscriptions/audit", headers=bearer(SERVICE)),
        router.get("/subscriptions/audit", headers=bearer(SERVICE)),
        router.post("/subscriptions/audit/receive", json={"wait_s": 0}, headers=bearer(SERVICE)),
        router.post("/subscriptions/audit/ack", json={"receipts": ["r"]}, headers=bearer(SERVICE)),
        router.post("/subscriptions/audit/nack", json={"receipts": ["r"], "delay_s": 1}, headers=bearer(SERVICE)),
        router.post(
            "/subscriptions/audit/extend", json={"receipts": ["r"], "visibility_timeout_s": 5}, headers=bearer(SERVICE)
        ),
    ]
    for attempt in refused:
        response = await attempt
        assert response.status_code == 403, response.request.url
        assert response.headers["content-type"] == "application/problem+json"
    kept = await router.get("/subscriptions/audit", headers=bearer(ADMIN))
    assert kept.json()["target"] == {"queue": {}}
    # An admin changing a service's subscription leaves it the service's.
    await router.put("/subscriptions/jobs", json=QUEUE, headers=bearer(SERVICE))
    assert (await router.put("/subscriptions/jobs", json=QUEUE, headers=bearer(ADMIN))).json()["owner"] == "service"


async def test_only_its_owners_scope_may_stream_a_subscription(router: httpx.AsyncClient) -> None:
    await router.put("/subscriptions/audit", json=QUEUE, headers=bearer(ADMIN))
    for token in (SERVICE, USER):  # refused before the stream starts: a problem, not a 200 that never ends
        response = await router.post("/subscriptions/audit/stream", json={}, headers=bearer(token))
        assert response.status_code == 403, token
        assert response.headers["content-type"] == "application/problem+json"


async def test_the_admin_token_may_do_everything(router: httpx.AsyncClient) -> None:
    await router.put("/subscriptions/jobs", json=QUEUE, headers=bearer(SERVICE))
    assert (await router.post("/events", json=event(), headers={**STRUCTURED, **bearer(ADMIN)})).status_code == 202
    for response in [
        await router.get("/subscriptions", headers=bearer(ADMIN)),
        await router.get("/subscriptions/jobs/dead-letters", headers=bearer(ADMIN)),
        await router.post("/subscriptions/jobs/dead-letters/redrive", headers=bearer(ADMIN)),
        await router.delete("/subscriptions/jobs/dead-letters", headers=bearer(ADMIN)),
        await router.post("/subscriptions/jobs/receive", json={"wait_s": 0}, headers=bearer(ADMIN)),
    ]:
        assert response.status_code == 200, response.request.url
    assert (await router.delete("/subscriptions/jobs", headers=bearer(ADMIN))).status_code == 204


async def test_a_route_the_table_does_not_name_needs_admin(router: httpx.AsyncClient) -> None:
    assert (await router.get("/nowhere", headers=bearer(SERVICE))).status_code == 403
    assert (await router.get("/nowhere", headers=bearer(ADMIN))).status_code == 404


async def test_the_openapi_document_names_each_operations_scope(router: httpx.AsyncClient) -> None:
    schema = (await router.get("/openapi.json")).json()
    assert schema["components"]["securitySchemes"]["service"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "CATTUBE_SERVICE_TOKEN: the service scope (a wider token is accepted too).",
    }
    paths = schema["paths"]
    assert paths["/events"]["post"]["security"] == [{"service": []}, {"admin": []}]
    assert paths["/subscriptions/{name}/dead-letters/redrive"]["post"]["security"] == [{"admin": []}]
    assert {"401", "403"} <= set(paths["/events"]["post"]["responses"])
    assert "security" not in paths["/healthz"]["get"]


async def test_without_tokens_nothing_is_asked_or_documented(router_settings: Callable[..., RouterSettings]) -> None:
    async with running(create_app(router_settings(), exit_on_failure=False)) as client:
        assert (await client.delete("/subscriptions/x/dead-letters")).status_code == 404
        schema = (await client.get("/openapi.json")).json()
        assert "securitySchemes" not in schema.get("components", {})
        created = await client.put("/subscriptions/x", json=QUEUE)
        assert created.json()["owner"] == "service"


def test_two_scopes_may_not_share_a_token(router_settings: Callable[..., RouterSettings]) -> None:
    with pytest.raises(ValueError, match="must differ"):
        router_settings(token="same", service_token="same")
