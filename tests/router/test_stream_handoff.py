"""Hand-off to streams: a stream with free slots waiting in its subscription's line gets new messages leased to
it in the append's own transaction (router.fanout, router.streams), with receive's receipts, attempts and
visibility, and no lease query of its own. Before, each event cost the stream a wake-up and a lease query."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from router.bus import Bus
from router.fanout import Handoffs
from tests.router.events import event
from tests.router.test_streams import Served, ack, make_queue, open_stream, publish, served, stats
from tests.router.test_wakeups import Leases

pytestmark = pytest.mark.engines  # CI runs these on PostgreSQL too (scripts/check)

__all__ = ["served"]  # the fixture, shared with test_streams


async def test_a_publish_to_a_waiting_stream_runs_no_lease_query_and_acks_and_nacks_work(served: Served) -> None:
    client = served.client
    await make_queue(client)
    bus = served.bus  # once the router has started (it answered)
    leases = Leases(bus)
    async with open_stream(client, prefetch=5) as lines:
        await leases.reached(1)  # its first read found nothing: it waits in line, its free slots offered
        assert bus.fanout.offered("q") == 5
        await publish(client, event(id="one"))
        one = await lines.next()
        assert (one["event"]["id"], one["attempt"]) == ("one", 1)
        assert leases.calls == 1  # leased in the append's transaction: no lease query, no wake-up
        numbers = await stats(client)
        assert (numbers["in_flight"], numbers["backlog"]) == (1, 0)
        assert [r["ok"] for r in await ack(client, one["receipt"])] == [True]
        assert [r["ok"] for r in await ack(client, one["receipt"])] == [False]  # settled once
        await publish(client, event(id="two"))
        two = await lines.next()
        assert (two["event"]["id"], two["attempt"], leases.calls) == ("two", 1, 1)
        # A nack makes it ready again: it comes back through the line, as the next attempt.
        await ack(client, two["receipt"], verb="nack")
        again = await lines.next()
        assert (again["event"]["id"], again["attempt"]) == ("two", 2)
        assert [r["ok"] for r in await ack(client, again["receipt"])] == [True]
    numbers = await stats(client)
    assert (numbers["in_flight"], numbers["backlog"], numbers["delivered_total"]) == (0, 0, 2)


async def test_a_handed_off_message_not_acked_in_its_visibility_timeout_comes_again(served: Served) -> None:
    client = served.client
    await make_queue(client, max_receive_count=2)
    bus = served.bus
    leases = Leases(bus)
    async with open_stream(client, prefetch=1, visibility_timeout_s=0.3) as lines:
        await leases.reached(1)
        await publish(client, event(id="slow"))
        first = await lines.next()
        assert (first["event"]["id"], first["attempt"], leases.calls) == ("slow", 1, 1)
        second = await lines.next()  # its lease ran out: the slot freed itself, and the message came again
        assert (second["event"]["id"], second["attempt"]) == ("slow", 2)
        assert (await ack(client, first["receipt"]))[0]["ok"] is False  # the first receipt is stale
        assert (await ack(client, second["receipt"]))[0]["ok"] is True


async def test_several_streams_of_one_subscription_take_turns(served: Served) -> None:
    client = served.client
    await make_queue(client)
    bus = served.bus  # once the router has started (it answered)
    leases = Leases(bus)
    async with open_stream(client, prefetch=10) as a, open_stream(client, prefetch=10) as b:
        await leases.reached(2)
        assert bus.fanout.offered("q") == 20
        for i in range(4):
            await publish(client, event(id=f"e{i}"))
        got_a, got_b = await a.take(2), await b.take(2)
        assert sorted(m["event"]["id"] for m in got_a + got_b) == ["e0", "e1", "e2", "e3"]
        assert leases.calls == 2
        receipts = [m["receipt"] for m in got_a + got_b]
        assert all(r["ok"] for r in await ack(client, *receipts))


async def test_a_long_poll_waiting_beside_a_stream_is_served_through_the_line(served: Served) -> None:
    """While a receive waits, hand-offs to the subscription's streams pause: the line (stream and receive, in the
    order they came) decides, as it did before hand-offs, so a receive is never starved by streams."""
    client = served.client
    await make_queue(client)
    bus = served.bus  # once the router has started (it answered)
    leases = Leases(bus)
    async with open_stream(client, prefetch=10) as lines:
        await leases.reached(1)
        receive = asyncio.create_task(client.post("/subscriptions/q/receive", json={"max_messages": 1, "wait_s": 20}))
        await leases.reached(2)
        await publish(client, event(id="first"))  # the stream is first in line
        assert (await lines.next())["event"]["id"] == "first"
        await publish(client, event(id="second"))  # then the receive (the stream joined the line again behind it)
        answer = (await receive).json()["messages"]
        assert [m["event"]["id"] for m in answer] == ["second"]
        calls = leases.calls
        await publish(client, event(id="third"))  # no receive waiting: handed to the stream again
        assert (await lines.next())["event"]["id"] == "third"
        assert leases.calls == calls


@pytest.mark.parametrize("when", ["before", "after"])
async def test_messages_handed_to_a_stream_whose_client_hung_up_go_back_at_once(
    router_app: FastAPI, router: httpx.AsyncClient, when: str
) -> None:
    """The client hangs up as the append's commit hands it messages (before they reach the stream, or after, while
    they wait to be sent): they are released at once, their attempt not counted, not hidden for 30 s."""
    bus: Bus = router_app.state.bus
    await make_queue(router)
    leases = Leases(bus)
    gone = asyncio.Event()
    batches = bus.streams.run("q", 5, 30, 15, gone)
    first = asyncio.create_task(anext(batches, None))
    await leases.reached(1)
    handed: list[Handoffs] = []
    original = bus.fanout.hand_off

    def hang_up_as_handed(handoffs: Handoffs) -> None:
        if not handoffs:  # another transaction's (a store may call it after every commit)
            original(handoffs)
            return
        handed.append(handoffs)
        if when == "before":
            gone.set()
        original(handoffs)
        if when == "after":
            gone.set()

    bus.fanout.hand_off = hang_up_as_handed  # type: ignore[method-assign]
    await publish(router, *[event(id=f"e{i}") for i in range(3)])
    assert await first is None  # the stream ended without sending them
    await batches.aclose()
    await bus.streams.close()  # the releases under way are done
    assert [len(messages) for h in handed for messages in h.values()] == [3]
    assert bus.fanout.offered("q") == 0
    got: list[dict[str, Any]] = (await router.post("/subscriptions/q/receive", json={"max_messages": 3})).json()[
        "messages"
    ]
    assert [(m["event"]["id"], m["attempt"]) for m in got] == [("e0", 1), ("e1", 1), ("e2", 1)]
    assert leases.calls == 2


async def test_hand_offs_never_fill_the_window_past_prefetch(served: Served) -> None:
    client = served.client
    await make_queue(client)
    bus = served.bus
    leases = Leases(bus)
    async with open_stream(client, prefetch=1) as lines:
        await leases.reached(1)
        await publish(client, event(id="e0"))
        e0 = await lines.next()
        await publish(client, event(id="e1"))  # no slot free: queued, and waits for one
        numbers = await stats(client)
        assert (numbers["in_flight"], numbers["backlog"], bus.fanout.offered("q")) == (1, 1, 0)
        await ack(client, e0["receipt"])
        e1 = await lines.next()  # the freed slot reads it (a lease query: it was not handed off)
        assert (e1["event"]["id"], e1["attempt"], leases.calls) == ("e1", 1, 2)
        await ack(client, e1["receipt"])
        await leases.reached(3)  # a full window's read may have left some behind: it reads once more, finds none
        await publish(client, event(id="e2"))  # and offers the slot: handed off
        e2 = await lines.next()
        assert (e2["event"]["id"], leases.calls) == ("e2", 3)
        await ack(client, e2["receipt"])  # frees the slot while it is offered: offered again at once
        await publish(client, event(id="e3"))
        assert ((await lines.next())["event"]["id"], leases.calls) == ("e3", 3)
