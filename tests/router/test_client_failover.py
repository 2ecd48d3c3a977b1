"""The client SDK given several routers: it sticks with one and moves on when it is unreachable or answers 503."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from router.client import RouterClient, RouterUnavailable, new_event
from tests.process import free_port, service
from tests.replicas import DOWN, Replicas, unavailable


async def publish_receive_ack(client: RouterClient, event_id: str) -> None:
    await client.publish(new_event("t", "tests", {}, id=event_id))
    (message,) = await client.queue("work").receive(wait_s=1)
    assert message.event["id"] == event_id
    assert (await client.queue("work").ack([message.receipt]))[0]["ok"]


async def test_a_router_on_a_closed_port_is_passed_over_once(router_app: FastAPI) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    replicas = Replicas({"http://live": httpx.ASGITransport(app=router_app)})
    # No retries: moving on to the next router happens within the call, not after a backoff.
    async with RouterClient([dead, "http://live"], transport=replicas, retries=0) as client:
        await client.ensure_subscription("work", pattern=None, target={"queue": {}})
        await publish_receive_ack(client, "e1")
        assert client.base_url == "http://live"
    assert replicas.seen.count(dead) == 1  # then it stayed with the live one (connections reused)
    assert len(replicas.seen) == 5


async def test_a_router_answering_503_is_passed_over(router_app: FastAPI) -> None:
    replicas = Replicas(
        {"http://busy": httpx.ASGITransport(app=unavailable), "http://live": httpx.ASGITransport(app=router_app)}
    )
    async with RouterClient(["http://busy", "http://live"], transport=replicas, retries=0) as client:
        await client.ensure_subscription("work", pattern=None, target={"queue": {}})
        await publish_receive_ack(client, "e1")
    assert replicas.seen.count("http://busy") == 1


async def test_it_comes_back_around_to_the_first_router(router_app: FastAPI) -> None:
    # One app behind both names: replicas over one database, where a receipt from one acks on the other.
    replica = httpx.ASGITransport(app=router_app)
    replicas = Replicas({"http://a": DOWN, "http://b": replica})
    async with RouterClient(["http://a", "http://b"], transport=replicas, retries=0) as client:
        await client.ensure_subscription("work", pattern=None, target={"queue": {}})
        await client.publish(new_event("t", "tests", {}, id="e1"))
        (message,) = await client.queue("work").receive(wait_s=1)
        assert client.base_url == "http://b"
        replicas.routes.update({"http://a": replica, "http://b": DOWN})  # a is back, b dies
        replicas.seen.clear()
        assert (await client.queue("work").ack([message.receipt]))[0]["ok"]
        await publish_receive_ack(client, "e2")
        assert client.base_url == "http://a"
    assert replicas.seen == ["http://b", "http://a", "http://a", "http://a", "http://a"]


async def test_when_every_router_fails_the_last_failure_is_reported() -> None:
    replicas = Replicas({"http://a": DOWN, "http://b": httpx.ASGITransport(app=unavailable)})
    async with RouterClient(["http://a", "http://b"], transport=replicas, retries=0) as client:
        with pytest.raises(RouterUnavailable) as failed:
            await client.publish(new_event("t", "tests", {}))
    assert (failed.value.status, failed.value.problem["detail"]) == (503, "the database is unreachable")
    assert replicas.seen == ["http://a", "http://b"]


@pytest.mark.slow
async def test_long_polls_move_to_the_next_router_when_theirs_is_killed(tmp_path: Path) -> None:
    # Two routers with a bus each (their numbers tell them apart), whatever engine the suite runs on.
    own_bus = {"CATTUBE_ROUTER_DATABASE_URL": ""}
    async with (
        service("router", {"CATTUBE_DATA_DIR": str(tmp_path / "a"), **own_bus}) as a,
        service("router", {"CATTUBE_DATA_DIR": str(tmp_path / "b"), **own_bus}) as b,
        RouterClient(a.url) as only_a,
        RouterClient(b.url) as only_b,
    ):
        for one in (only_a, only_b):
            await one.ensure_subscription("work", pattern=None, target={"queue": {}})
        await only_b.publish_batch([new_event("t", "tests", {}) for _ in range(2)])
        async with RouterClient([a.url, b.url], retries=0) as client:
            watcher = client.watch_stats("work", wait_s=20)
            assert (await anext(watcher)).backlog == 0  # a's numbers
            waiting = asyncio.ensure_future(anext(watcher))
            await asyncio.sleep(0.2)
            assert not waiting.done()  # a long poll on a
            await a.kill()
            assert (await asyncio.wait_for(waiting, 15)).backlog == 2  # b's numbers
            await watcher.aclose()

            await only_b.queue("work").receive(max_messages=2, wait_s=1, visibility_timeout_s=300)
            receiving = asyncio.ensure_future(client.queue("work").receive(wait_s=20))
            await asyncio.sleep(0.2)
            assert not receiving.done()  # a long poll on b (its two messages are taken)
            await a.start()  # a comes back, then b is killed
            await b.kill()
            await only_a.publish(new_event("t", "tests", {}, id="after"))
            (message,) = await asyncio.wait_for(receiving, 15)
            assert message.event["id"] == "after"
            assert (await client.queue("work").ack([message.receipt]))[0]["ok"]
            assert client.base_url == a.url
