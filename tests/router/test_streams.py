"""Streaming receive (`POST /subscriptions/{name}/stream`): a window of `prefetch` messages in flight over one
long NDJSON response, with receive's receipts, visibility timeout and dead letters. Against an in-process
router served by uvicorn on a loopback port (httpx's ASGI transport holds a response until it ends)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from router.app import create_app
from router.bus import Bus
from router.persistence import Message
from router.settings import RouterSettings
from tests.router.events import BATCH, event

pytestmark = pytest.mark.engines  # CI runs these on PostgreSQL too (scripts/check)


class Served:
    def __init__(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        self.app = app
        self.client = client

    @property
    def bus(self) -> Bus:
        bus: Bus = self.app.state.bus
        return bus


@contextlib.asynccontextmanager
async def serve(settings: RouterSettings) -> AsyncIterator[Served]:
    app = create_app(settings, exit_on_failure=False)
    # A socket listening before uvicorn starts: the first requests wait in its backlog until it serves.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield Served(app, client)
    finally:
        with contextlib.suppress(AttributeError):
            app.state.begin_shutdown()
        server.should_exit = True
        await task
        sock.close()


@pytest.fixture
async def served(router_settings: Callable[..., RouterSettings]) -> AsyncIterator[Served]:
    async with serve(router_settings()) as result:
        yield result


async def make_queue(client: httpx.AsyncClient, name: str = "q", **delivery: Any) -> None:
    response = await client.put(
        f"/subscriptions/{name}", json={"pattern": None, "target": {"queue": {}}, "delivery": delivery}
    )
    assert response.status_code in (200, 201), response.text


async def publish(client: httpx.AsyncClient, *events: dict[str, Any]) -> None:
    response = await client.post("/events", content=json.dumps(list(events)), headers=BATCH)
    assert response.status_code == 202, response.text


async def stats(client: httpx.AsyncClient, name: str = "q") -> dict[str, Any]:
    result: dict[str, Any] = (await client.get(f"/subscriptions/{name}/stats")).json()
    return result


class Lines:
    """The lines of one open stream, heartbeats left out unless asked for."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()

    async def next(self, *, heartbeats: bool = False) -> dict[str, Any]:
        async with asyncio.timeout(20):  # a hang guard, not a measure
            while True:
                line = await anext(self._lines)
                if line:
                    item: dict[str, Any] = json.loads(line)
                    if heartbeats or "heartbeat" not in item:
                        return item

    async def take(self, count: int) -> list[dict[str, Any]]:
        return [await self.next() for _ in range(count)]

    async def rest(self) -> list[str]:
        async with asyncio.timeout(20):
            return [line async for line in self._lines if line]


@contextlib.asynccontextmanager
async def open_stream(client: httpx.AsyncClient, name: str = "q", **body: Any) -> AsyncIterator[Lines]:
    async with client.stream("POST", f"/subscriptions/{name}/stream", json=body) as response:
        assert response.status_code == 200, (await response.aread()).decode()
        assert response.headers["content-type"] == "application/x-ndjson"
        yield Lines(response)


async def ack(client: httpx.AsyncClient, *receipts: str, verb: str = "ack", **extra: Any) -> list[dict[str, Any]]:
    response = await client.post(f"/subscriptions/q/{verb}", json={"receipts": list(receipts), **extra})
    assert response.status_code == 200, response.text
    results: list[dict[str, Any]] = response.json()["results"]
    return results


async def test_the_stream_holds_at_most_prefetch_and_each_ack_frees_a_slot(served: Served) -> None:
    client = served.client
    await make_queue(client)
    await publish(client, *[event(id=f"e{i}") for i in range(10)])
    async with open_stream(client, prefetch=3) as lines:
        first = await lines.take(3)
        assert [m["event"]["id"] for m in first] == ["e0", "e1", "e2"]
        assert all(set(m) == {"receipt", "attempt", "sequence", "event"} for m in first)
        numbers = await stats(client)
        assert (numbers["in_flight"], numbers["backlog"]) == (3, 7)  # no more while nothing is acked
        assert all(r["ok"] for r in await ack(client, first[0]["receipt"], first[1]["receipt"]))
        second = await lines.take(2)
        assert [m["event"]["id"] for m in second] == ["e3", "e4"]
        assert ((await stats(client))["in_flight"], (await stats(client))["backlog"]) == (3, 5)
        # A nack frees a slot too (the message given back waits in line again, behind the older ones).
        await ack(client, first[2]["receipt"], verb="nack")
        assert (await lines.next())["event"]["id"] == "e5"
        numbers = await stats(client)
        assert (numbers["in_flight"], numbers["backlog"]) == (3, 5)


async def test_the_window_holds_while_acks_and_messages_cross(served: Served) -> None:
    """However acks and new messages cross (acks of one to three receipts, sent while others are out), the
    leases the store holds never pass prefetch, and every message comes once."""
    client = served.client
    await make_queue(client)
    await publish(client, *[event(id=f"e{i}") for i in range(120)])
    seen: list[str] = []
    held: list[str] = []
    most = 0
    acks: list[asyncio.Task[list[dict[str, Any]]]] = []
    async with open_stream(client, prefetch=7) as lines:
        while len(seen) < 120:
            message = await lines.next()
            seen.append(message["event"]["id"])
            held.append(message["receipt"])
            if len(held) >= 1 + len(seen) % 3 or len(seen) == 120:
                acks.append(asyncio.create_task(ack(client, *held)))
                held = []
            most = max(most, (await stats(client))["in_flight"])
        assert all(r["ok"] for results in await asyncio.gather(*acks) for r in results)
    assert 1 < most <= 7
    assert seen == [f"e{i}" for i in range(120)]


async def test_a_message_not_acked_in_time_frees_its_slot_comes_again_and_is_dead_lettered(served: Served) -> None:
    client = served.client
    await make_queue(client, max_receive_count=2)
    await publish(client, event(id="slow"))
    async with open_stream(client, prefetch=1, visibility_timeout_s=0.3) as lines:
        one = await lines.next()
        two = await lines.next()  # the slot freed itself when the lease expired: the same message, again
        assert [(m["event"]["id"], m["attempt"]) for m in (one, two)] == [("slow", 1), ("slow", 2)]
        await publish(client, event(id="next"))
        three = await lines.next()  # after "slow" expired again, "next" was first in line
        assert (three["event"]["id"], three["attempt"]) == ("next", 1)
        assert (await ack(client, three["receipt"]))[0]["ok"] is True
        # The freed slot leases "slow" a third time: received twice already, it is dead-lettered instead.
        numbers = await stats(client)
        async with asyncio.timeout(20):
            while numbers["dead_lettered"] == 0:
                params = {"wait_s": 20, "version": numbers["version"]}
                numbers = (await client.get("/subscriptions/q/stats", params=params)).json()
    dead = (await client.get("/subscriptions/q/dead-letters")).json()["items"]
    assert [(d["event"]["id"], d["attempts"]) for d in dead] == [("slow", 2)]


async def test_an_extend_keeps_the_slot_and_heartbeats_keep_the_line_alive(served: Served) -> None:
    client = served.client
    await make_queue(client)
    await publish(client, event(id="long"), event(id="after"))
    async with open_stream(client, prefetch=1, visibility_timeout_s=1, heartbeat_s=0.05) as lines:
        message = await lines.next()
        assert (await ack(client, message["receipt"], verb="extend", visibility_timeout_s=60))[0]["ok"]
        assert (await lines.next(heartbeats=True)) == {"heartbeat": True}
        numbers = await stats(client)
        assert (numbers["in_flight"], numbers["backlog"]) == (1, 1)
        await ack(client, message["receipt"])
        assert (await lines.next())["event"]["id"] == "after"


async def test_nothing_is_leased_for_a_client_that_hung_up(served: Served) -> None:
    client = served.client
    await make_queue(client)
    async with open_stream(client, prefetch=5, heartbeat_s=0.05) as lines:
        await lines.next(heartbeats=True)
    # Hung up: whatever the stream leases from now on goes back at once, not after a visibility timeout.
    await publish(client, *[event(id=f"e{i}") for i in range(3)])
    got: list[dict[str, Any]] = []
    async with asyncio.timeout(20):  # with the messages kept hidden for 30 s, this is where it would hang
        while len(got) < 3:
            response = await client.post("/subscriptions/q/receive", json={"max_messages": 3, "wait_s": 20})
            got += response.json()["messages"]
    assert sorted((m["event"]["id"], m["attempt"]) for m in got) == [("e0", 1), ("e1", 1), ("e2", 1)]
    assert served.bus.streams.open == 0


async def test_messages_leased_as_the_client_hangs_up_go_back_at_once(
    router_app: FastAPI, router: httpx.AsyncClient
) -> None:
    bus: Bus = router_app.state.bus
    await make_queue(router)
    await publish(router, *[event(id=f"e{i}") for i in range(3)])
    gone = asyncio.Event()
    original = bus.store.receive

    async def lease_then_hang_up(*args: Any, **kwargs: Any) -> list[Message]:
        messages = await original(*args, **kwargs)
        gone.set()  # the client went away while its messages were being leased
        return messages

    bus.store.receive = lease_then_hang_up  # type: ignore[method-assign]
    assert [batch async for batch in bus.streams.run("q", 5, 30, 15, gone)] == []
    bus.store.receive = original  # type: ignore[method-assign]
    got = (await router.post("/subscriptions/q/receive", json={"max_messages": 3})).json()["messages"]
    assert [(m["event"]["id"], m["attempt"]) for m in got] == [("e0", 1), ("e1", 1), ("e2", 1)]


async def test_shutdown_ends_every_stream_at_once(served: Served) -> None:
    client = served.client
    await make_queue(client)
    async with open_stream(client, prefetch=2) as lines:
        await publish(client, event(id="one"))
        assert (await lines.next())["event"]["id"] == "one"
        served.app.state.begin_shutdown()
        assert await lines.rest() == []  # the response ended


async def test_deleting_the_subscription_ends_its_streams(served: Served) -> None:
    client = served.client
    await make_queue(client)
    async with open_stream(client, heartbeat_s=0.05) as lines:
        await lines.next(heartbeats=True)  # streaming, waiting in line
        assert (await client.delete("/subscriptions/q")).status_code == 204
        rest = [json.loads(line) for line in await lines.rest()]
        assert "no subscription named 'q'" in rest[-1]["error"]


async def test_streams_past_the_cap_are_refused_and_bad_bodies_named(
    router_settings: Callable[..., RouterSettings],
) -> None:
    async with serve(router_settings(max_streams=1)) as served:
        client = served.client
        await make_queue(client)
        async with open_stream(client, heartbeat_s=0.05) as lines:
            await lines.next(heartbeats=True)
            refused = await client.post("/subscriptions/q/stream", json={})
            assert refused.status_code == 503
            assert refused.headers["content-type"] == "application/problem+json"
            assert "CATTUBE_MAX_STREAMS" in refused.json()["detail"]
        for body, field in (
            ({"prefetch": 0}, "body.prefetch"),
            ({"prefetch": 1001}, "body.prefetch"),
            ({"nope": 1}, "body.nope"),
        ):
            bad = await client.post("/subscriptions/q/stream", json=body)
            assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == field, bad.text
        assert (await client.post("/subscriptions/none/stream", json={})).status_code == 404


async def test_the_stream_is_documented() -> None:
    app = create_app(RouterSettings(data_dir="/nonexistent"), exit_on_failure=False)
    operation = app.openapi()["paths"]["/subscriptions/{name}/stream"]["post"]
    assert "application/x-ndjson" in operation["responses"]["200"]["content"]
    assert "prefetch" in json.dumps(operation["requestBody"])
