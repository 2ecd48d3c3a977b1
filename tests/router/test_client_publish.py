"""Concurrent publishes share requests (router/client_publish.py), and each still gets its own answer."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from router.client import RouterClient, RouterError, new_event
from router.client_publish import PublishCoalescer


class Counting(httpx.AsyncBaseTransport):
    """The in-process router's transport, recording how many events each `POST /events` carried."""

    def __init__(self, app: FastAPI) -> None:
        self.inner = httpx.ASGITransport(app=app)
        self.batches: list[int] = []
        self.sizes: list[int] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path == "/events":
            body = request.read()
            self.batches.append(len(json.loads(body)))
            self.sizes.append(len(body))
        return await self.inner.handle_async_request(request)


@pytest.fixture
async def counted(router_app: FastAPI) -> Counting:
    return Counting(router_app)


def events(count: int, prefix: str = "e", **data: Any) -> list[dict[str, Any]]:
    return [new_event("tests.coalesced", "tests", {"n": n, **data}, id=f"{prefix}{n}") for n in range(count)]


async def test_concurrent_publishes_share_requests_and_each_gets_its_own_result(counted: Counting) -> None:
    async with RouterClient("http://router", transport=counted) as client:
        results = await asyncio.gather(*(client.publish(e) for e in events(16)))
    assert [r.id for r in results] == [f"e{n}" for n in range(16)]
    assert len({r.sequence for r in results}) == 16 and not any(r.duplicate for r in results)
    assert sum(counted.batches) == 16
    assert len(counted.batches) < 16, f"every publish went alone: {counted.batches}"


async def test_one_publish_at_a_time_goes_alone(counted: Counting) -> None:
    async with RouterClient("http://router", transport=counted) as client:
        for event in events(3):
            await client.publish(event)
    assert counted.batches == [1, 1, 1]


async def test_without_coalescing_every_publish_is_a_request(counted: Counting) -> None:
    async with RouterClient("http://router", transport=counted, coalesce_publishes=False) as client:
        await asyncio.gather(*(client.publish(e) for e in events(4)))
    assert counted.batches == [1, 1, 1, 1]


async def test_a_bad_event_fails_alone_among_the_publishes_it_travelled_with(counted: Counting) -> None:
    good = events(4)
    bad = {**events(1, prefix="bad")[0], "specversion": "0.3"}  # the router refuses it: 400
    async with RouterClient("http://router", transport=counted) as client:
        outcomes = await asyncio.gather(
            *(client.publish(e) for e in [*good[:2], bad, *good[2:]]), return_exceptions=True
        )
    refused = outcomes[2]
    assert isinstance(refused, RouterError) and refused.status == 400
    assert [r.id for r in outcomes if not isinstance(r, BaseException)] == ["e0", "e1", "e2", "e3"]
    assert counted.batches[0] == 5, "they travelled together first"


async def test_a_publish_cancelled_before_it_left_is_not_sent(counted: Counting) -> None:
    async with RouterClient("http://router", transport=counted) as client:
        first, second, third = (asyncio.create_task(client.publish(e)) for e in events(3))
        await asyncio.sleep(0)  # all three queued; the sender has not run yet
        second.cancel()
        await asyncio.gather(first, third)
        with pytest.raises(asyncio.CancelledError):
            await second
    assert counted.batches == [2]


async def test_a_request_carries_at_most_the_byte_bound(counted: Counting) -> None:
    big = events(5, pad="x" * (PublishCoalescer.MAX_BYTES // 3))
    async with RouterClient("http://router", transport=counted) as client:
        await asyncio.gather(*(client.publish(e) for e in big))
    assert sum(counted.batches) == 5 and max(counted.batches) == 2
    assert max(counted.sizes) <= PublishCoalescer.MAX_BYTES + 2  # the brackets


async def test_closing_the_client_fails_the_publishes_still_queued(router_app: FastAPI) -> None:
    release = asyncio.Event()

    async def held(batch: bytes) -> list[dict[str, Any]]:
        await release.wait()
        return [{"id": "x", "sequence": 1, "duplicate": False}]

    coalescer = PublishCoalescer(held)
    out = asyncio.create_task(coalescer.publish(b"{}"))
    queued = asyncio.create_task(coalescer.publish(b"{}"))
    await asyncio.sleep(0)
    await coalescer.aclose()
    for task in (out, queued):
        with pytest.raises(RuntimeError, match="interrupted|closed"):
            await task


async def test_a_refusal_of_the_request_itself_fails_every_publish_once() -> None:
    sent: list[bytes] = []

    async def refused(batch: bytes) -> list[dict[str, Any]]:
        sent.append(batch)
        raise RouterError(401, {"title": "Unauthorized", "detail": "Authorization: expected a valid token"})

    coalescer = PublishCoalescer(refused)
    outcomes = await asyncio.gather(*(coalescer.publish(b"{}") for _ in range(3)), return_exceptions=True)
    assert all(isinstance(o, RouterError) and o.status == 401 for o in outcomes)
    assert len(sent) == 1, "a bad token is not one event's fault: nothing is sent again"


async def test_an_answer_with_the_wrong_number_of_results_fails_the_publishes_instead_of_hanging() -> None:
    async def short(batch: bytes) -> list[dict[str, Any]]:
        return [{"id": "x", "sequence": 1, "duplicate": False}]  # one result for every batch

    coalescer = PublishCoalescer(short)
    outcomes = await asyncio.wait_for(
        asyncio.gather(*(coalescer.publish(b"{}") for _ in range(3)), return_exceptions=True), 10
    )
    assert all(isinstance(o, RuntimeError) and "1 results for 3 events" in str(o) for o in outcomes)
