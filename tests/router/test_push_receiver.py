"""The consumer side of push: `PushReceiver` accepts the router's signed deliveries and refuses the rest."""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from standardwebhooks.webhooks import Webhook

from router.client import PushReceiver
from router.delivery import backoff_s, parse_retry_after, request_for
from router.persistence import Message
from services.common.problems import install_problem_handlers

SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
EVENT = {"specversion": "1.0", "id": "e1", "source": "tests", "type": "t", "partitionkey": "k", "data": {"a": 1}}


@pytest.fixture
async def consumer() -> AsyncIterator[tuple[httpx.AsyncClient, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []
    receiver = PushReceiver(SECRET)
    app = FastAPI()
    install_problem_handlers(app)

    # Default-value style: with postponed annotations FastAPI cannot see a dependency that is a local.
    @app.post("/events", status_code=204)
    async def on_event(event: dict[str, Any] = Depends(receiver)) -> None:  # noqa: B008
        received.append(event)

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://consumer") as client:
        yield client, received


def delivery(mode: str = "structured", secret: str = SECRET) -> tuple[bytes, dict[str, str]]:
    message = Message("r", 1, 7, json.dumps(EVENT).encode())
    return request_for(message, mode, Webhook(secret))


@pytest.mark.parametrize("mode", ["structured", "binary"])
async def test_a_signed_delivery_is_accepted_in_either_mode(
    consumer: tuple[httpx.AsyncClient, list[dict[str, Any]]], mode: str
) -> None:
    client, received = consumer
    body, headers = delivery(mode)
    assert (await client.post("/events", content=body, headers=headers)).status_code == 204
    event = received[0]
    assert (event["id"], event["partitionkey"], event["data"]) == ("e1", "k", {"a": 1})


async def test_unsigned_forged_and_stale_deliveries_get_401(
    consumer: tuple[httpx.AsyncClient, list[dict[str, Any]]],
) -> None:
    client, received = consumer
    body, headers = delivery()
    unsigned = {k: v for k, v in headers.items() if not k.startswith("webhook-")}
    _, forged_headers = delivery(secret="whsec_" + base64.b64encode(b"another secret, 32 bytes long!!!").decode())
    tampered = body.replace(b'"e1"', b'"e2"')
    assert tampered != body
    old = datetime.now(UTC) - timedelta(minutes=6)
    stale = {**headers, "webhook-timestamp": str(int(old.timestamp()))}
    stale["webhook-signature"] = Webhook(SECRET).sign(headers["webhook-id"], old, body.decode())
    for bad_body, bad_headers in [(body, unsigned), (body, forged_headers), (tampered, headers), (body, stale)]:
        response = await client.post("/events", content=bad_body, headers=bad_headers)
        assert response.status_code == 401, bad_headers
        assert response.headers["content-type"] == "application/problem+json"
    assert received == []


async def test_without_a_secret_yet_deliveries_are_refused_with_503() -> None:
    app = FastAPI()
    receiver = PushReceiver()

    @app.post("/events")
    async def on_event(event: dict[str, Any] = Depends(receiver)) -> None: ...  # noqa: B008

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://c") as client:
        body, headers = delivery()
        assert (await client.post("/events", content=body, headers=headers)).status_code == 503


def test_backoff_is_exponential_with_full_jitter_between_the_bounds() -> None:
    for attempt in range(1, 20):
        for _ in range(50):
            delay = backoff_s(attempt, 1.0, 300.0)
            assert 1.0 <= delay <= min(300.0, 2 ** (attempt - 1))
    assert 1.0 <= backoff_s(5_000, 1.0, 300.0) <= 300.0  # 2 ** 4,999 as a float would overflow


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now = time.time()
    assert parse_retry_after("120") == 120
    http_date = datetime.fromtimestamp(now + 30, UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert 28 <= (parse_retry_after(http_date, now) or 0) <= 31
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
