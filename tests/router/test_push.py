"""Push delivery against a real router process and real HTTP receivers on loopback ports."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from router.client import RouterClient, new_event
from tests.process import ServiceProcess, free_port, service
from tests.router.receiver import Delivery, Receiver

pytestmark = [pytest.mark.slow, pytest.mark.engines]

FAST = {"backoff_initial_s": 0.05, "backoff_max_s": 0.2, "timeout_s": 2}


@pytest.fixture
async def router(tmp_path: Path) -> AsyncIterator[ServiceProcess]:
    async with service("router", {"CATTUBE_DATA_DIR": str(tmp_path)}) as proc:
        yield proc


@pytest.fixture
async def client(router: ServiceProcess) -> AsyncIterator[RouterClient]:
    async with RouterClient(router.url) as c:
        yield c


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    yield r
    await r.stop()


def script(*statuses: int, headers: dict[str, str] | None = None) -> Any:
    """Answer the n-th delivery with statuses[n] (the last one from then on)."""

    async def answer(delivery: Delivery, count: int) -> web.Response:
        return web.Response(status=statuses[min(count, len(statuses) - 1)], headers=headers)

    return answer


async def subscribe(client: RouterClient, receiver: Receiver, name: str = "hook", **delivery: Any) -> dict[str, Any]:
    return await client.ensure_subscription(
        name, pattern={"source": ["tests"]}, target={"url": receiver.url}, delivery={**FAST, **delivery}
    )


async def test_5xx_is_retried_until_2xx(client: RouterClient, receiver: Receiver) -> None:
    receiver.answer = script(503, 500, 200)
    await subscribe(client, receiver)
    await client.publish(new_event("t", "tests", {"n": 1}, id="e1"))
    deliveries = await receiver.wait_for(3)
    assert {d.headers["webhook-id"] for d in deliveries} == {deliveries[0].headers["webhook-id"]}
    assert all(json.loads(d.body)["id"] == "e1" for d in deliveries)
    stats = await client.stats("hook")  # settled already, or soon: long-poll only until it is
    while stats.delivered_total < 1:
        stats = await client.stats("hook", wait_s=5, version=stats.version)
    assert (stats.backlog, stats.in_flight, stats.delayed, stats.dead_lettered) == (0, 0, 0, 0)


async def test_429_honours_retry_after(client: RouterClient, receiver: Receiver) -> None:
    receiver.answer = script(429, 204, headers={"Retry-After": "1"})
    await subscribe(client, receiver, backoff_max_s=5)
    await client.publish(new_event("t", "tests", {}))
    first, second = await receiver.wait_for(2)
    assert second.at - first.at >= 0.9  # waited as told, not the 0.05 s backoff


async def test_400_is_permanent_one_attempt_then_a_dead_letter(client: RouterClient, receiver: Receiver) -> None:
    receiver.answer = script(400)
    await subscribe(client, receiver)
    await client.ensure_subscription("dlq", pattern={"type": ["cattube.router.dead-lettered"]}, target={"queue": {}})
    await client.publish(new_event("t", "tests", {}, id="bad"))
    (announcement,) = await client.queue("dlq").receive(wait_s=10)
    data = announcement.data
    assert (data["subscription"], data["event_id"], data["attempts"]) == ("hook", "bad", 1)
    assert (data["status"], data["limit"]) == (400, "permanent")
    assert len(receiver.deliveries) == 1
    letters = (await client._request("GET", "/subscriptions/hook/dead-letters")).json()["items"]
    assert letters[0]["context"]["status"] == 400 and letters[0]["event"]["id"] == "bad"
    # Redriven, it is delivered again (and this time accepted).
    receiver.answer = script(204)
    await client._request("POST", "/subscriptions/hook/dead-letters/redrive")
    await receiver.wait_for(2)


async def test_max_attempts_dead_letters(client: RouterClient, receiver: Receiver) -> None:
    receiver.answer = script(500)
    await subscribe(client, receiver, max_attempts=3)
    await client.ensure_subscription("dlq", pattern={"type": ["cattube.router.dead-lettered"]}, target={"queue": {}})
    await client.publish(new_event("t", "tests", {}))
    (announcement,) = await client.queue("dlq").receive(wait_s=10)
    assert (announcement.data["attempts"], announcement.data["limit"]) == (3, "max_attempts")
    assert len(receiver.deliveries) == 3


async def test_a_timeout_is_retried(client: RouterClient, receiver: Receiver) -> None:
    async def slow_then_fast(delivery: Delivery, count: int) -> web.Response:
        if count == 0:
            await asyncio.sleep(2)
        return web.Response(status=204)

    receiver.answer = slow_then_fast
    await subscribe(client, receiver, timeout_s=0.3)
    await client.publish(new_event("t", "tests", {}))
    await receiver.wait_for(2)


async def test_a_dead_receiver_that_comes_back_gets_the_event(client: RouterClient) -> None:
    receiver = Receiver(port=free_port())
    await subscribe(client, receiver)
    await client.publish(new_event("t", "tests", {}, id="patient"))
    await asyncio.sleep(0.5)  # a few connection-refused attempts
    await receiver.start()
    try:
        (delivery,) = await receiver.wait_for(1)
        assert json.loads(delivery.body)["id"] == "patient"
    finally:
        await receiver.stop()


async def test_binary_mode_puts_attributes_in_headers(client: RouterClient, receiver: Receiver) -> None:
    await subscribe(client, receiver, mode="binary")
    await client.publish(new_event("cattube.t", "tests", {"video_id": "v1"}, id="b1", partitionkey="v1"))
    (delivery,) = await receiver.wait_for(1)
    headers = {k.lower(): v for k, v in delivery.headers.items()}
    assert (headers["ce-id"], headers["ce-type"], headers["ce-partitionkey"]) == ("b1", "cattube.t", "v1")
    assert headers["content-type"] == "application/json" and json.loads(delivery.body) == {"video_id": "v1"}


async def test_ordered_delivery_per_key_under_failures(client: RouterClient, receiver: Receiver) -> None:
    rng = random.Random(7)

    async def flaky(delivery: Delivery, count: int) -> web.Response:
        return web.Response(status=503 if rng.random() < 0.1 else 204)

    receiver.answer = flaky
    await subscribe(client, receiver, ordered=True, backoff_initial_s=0.01, backoff_max_s=0.05)
    events = [new_event("t", "tests", {"key": i % 10, "n": i}, partitionkey=f"k{i % 10}") for i in range(1000)]
    for start in range(0, 1000, 100):
        await client.publish_batch(events[start : start + 100])
    succeeded: dict[str, list[int]] = {}
    seen_ok: set[str] = set()
    while len(seen_ok) < 1000:
        await receiver.wait_for(len(receiver.deliveries) + 1, timeout_s=60)
        seen_ok = {json.loads(d.body)["id"] for d in receiver.deliveries}
    for d in receiver.deliveries:
        event = json.loads(d.body)
        succeeded.setdefault(event["partitionkey"], [])
        numbers = succeeded[event["partitionkey"]]
        if not numbers or numbers[-1] != event["data"]["n"]:
            numbers.append(event["data"]["n"])  # a retry repeats the last one; anything else must move forward
    for key, numbers in succeeded.items():
        assert numbers == sorted(numbers), f"{key} out of order"
        assert len(numbers) == 100


async def test_a_failing_key_holds_back_only_itself(client: RouterClient, receiver: Receiver) -> None:
    async def block_a(delivery: Delivery, count: int) -> web.Response:
        return web.Response(status=503 if json.loads(delivery.body)["partitionkey"] == "a" else 204)

    receiver.answer = block_a
    await subscribe(client, receiver, ordered=True)
    await client.publish_batch([new_event("t", "tests", {"n": i}, partitionkey="ab"[i % 2]) for i in range(6)])
    await receiver.wait_for(5)
    b_ok = [json.loads(d.body)["data"]["n"] for d in receiver.deliveries if json.loads(d.body)["partitionkey"] == "b"]
    a_tried = {
        json.loads(d.body)["data"]["n"] for d in receiver.deliveries if json.loads(d.body)["partitionkey"] == "a"
    }
    assert b_ok == [1, 3, 5]
    assert a_tried == {0}  # only the head of key a is tried while it fails


async def test_a_slow_consumer_does_not_slow_another(client: RouterClient, receiver: Receiver) -> None:
    stuck = Receiver()

    async def hang(delivery: Delivery, count: int) -> web.Response:
        await stuck.hang()
        return web.Response(status=204)

    stuck.answer = hang
    await stuck.start()
    try:
        await subscribe(client, stuck, "stuck", timeout_s=30, max_in_flight=2)
        await subscribe(client, receiver, "fast")
        await client.publish_batch([new_event("t", "tests", {"n": i}) for i in range(20)])
        await receiver.wait_for(20, timeout_s=10)
        assert len(stuck.deliveries) <= 2  # max_in_flight bounds what waits on the stuck consumer
    finally:
        await stuck.stop()


async def test_replay_redelivers_marked_events(client: RouterClient, receiver: Receiver) -> None:
    await subscribe(client, receiver)
    await client.publish_batch([new_event("t", "tests", {"n": i}, id=f"r{i}") for i in range(3)])
    await client.publish(new_event("t", "elsewhere", {}))  # does not match: not replayed
    await receiver.wait_for(3)
    first_seq = (await client.publish(new_event("t", "tests", {}, id="after"))).sequence
    await receiver.wait_for(4)
    response = await client._request(
        "POST", "/subscriptions/hook/replay", json={"name": "again", "from": 1, "to": first_seq - 1}
    )
    assert response.status_code == 202 and response.json()["total"] == 3
    replayed = (await receiver.wait_for(7))[4:]
    assert sorted(json.loads(d.body)["id"] for d in replayed) == ["r0", "r1", "r2"]
    assert all(json.loads(d.body)["replay"] == "again" for d in replayed)
    async for stats in client.watch_stats("hook"):
        if stats.delivered_total == 7:
            break
    status = (await client._request("GET", "/subscriptions/hook/replays/again")).json()
    assert (status["total"], status["delivered"], status["pending"], status["done"]) == (3, 3, 0, True)


async def test_kill_9_mid_delivery_redelivers_after_the_lease_expires_with_attempts_intact(
    tmp_path: Path, receiver: Receiver
) -> None:
    """The restarted router is another replica: it leaves the dead one's lease to expire (it cannot tell a
    dead holder from a live one on another machine), then takes the delivery over."""
    held = asyncio.Event()

    async def hold_first(delivery: Delivery, count: int) -> web.Response:
        if count == 0:
            held.set()
            await receiver.hang()
        return web.Response(status=500)

    receiver.answer = hold_first
    router = ServiceProcess("router", free_port(), {"CATTUBE_DATA_DIR": str(tmp_path)})
    await router.start()
    try:
        async with RouterClient(router.url) as client:
            await subscribe(client, receiver, max_attempts=3, timeout_s=2)  # a lease of 2 + 5 s
            await client.ensure_subscription(
                "dlq", pattern={"type": ["cattube.router.dead-lettered"]}, target={"queue": {}}
            )
            await client.publish(new_event("t", "tests", {}, id="crash"))
            await asyncio.wait_for(held.wait(), 10)
            await router.kill()  # attempt 1 is under way
            await router.start()
            (announcement,) = await client.queue("dlq").receive(wait_s=20)
            # Attempt 1 before the crash counted: two more after it, not three.
            assert announcement.data["attempts"] == 3
            assert len(receiver.deliveries) == 3
    finally:
        await router.kill()
