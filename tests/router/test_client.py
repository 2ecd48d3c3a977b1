"""The client SDK against a real router process on a loopback port."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from router.client import RouterClient, RouterError, RouterUnavailable, new_event
from tests.process import ServiceProcess, free_port, service

pytestmark = [pytest.mark.slow, pytest.mark.engines]


@pytest.fixture
async def router_process(tmp_path: Path) -> AsyncIterator[ServiceProcess]:
    async with service("router", {"CATTUBE_DATA_DIR": str(tmp_path), "CATTUBE_TOKEN": "tok"}) as proc:
        yield proc


async def test_publish_subscribe_consume(router_process: ServiceProcess) -> None:
    async with RouterClient(router_process.url, token="tok") as client:
        sub = await client.ensure_subscription(
            "work",
            pattern={"type": ["cattube.video.uploaded"]},
            target={"queue": {}},
            delivery={"max_receive_count": 3},
        )
        assert sub["delivery"]["max_receive_count"] == 3
        event = new_event("cattube.video.uploaded", "cattube/upload", {"video_id": "v1"}, id="v1", partitionkey="v1")
        first = await client.publish(event)
        again = await client.publish(event)
        assert (first.duplicate, again.duplicate, again.sequence) == (False, True, first.sequence)
        queue = client.queue("work")
        (message,) = await queue.receive(wait_s=1)
        assert message.data == {"video_id": "v1"} and message.event["partitionkey"] == "v1"
        assert (await queue.extend([message.receipt], visibility_timeout_s=60))[0]["ok"]
        assert (await queue.ack([message.receipt]))[0]["ok"]
        stats = await client.stats("work")
        assert (stats.backlog, stats.in_flight, stats.delivered_total) == (0, 0, 1)


async def test_watch_stats_yields_each_change_without_polling(router_process: ServiceProcess) -> None:
    async with RouterClient(router_process.url, token="tok") as client:
        await client.ensure_subscription("w", pattern=None, target={"queue": {}})
        seen: list[int] = []
        watcher = client.watch_stats("w", wait_s=20)
        seen.append((await anext(watcher)).backlog)
        nxt = asyncio.ensure_future(anext(watcher))
        await asyncio.sleep(0.1)
        assert not nxt.done()
        await client.publish_batch([new_event("t", "tests", {}) for _ in range(3)])
        seen.append((await asyncio.wait_for(nxt, 5)).backlog)
        await watcher.aclose()
        assert seen == [0, 3]


async def test_refusals_raise_router_error_with_the_problem(router_process: ServiceProcess) -> None:
    async with RouterClient(router_process.url, token="tok") as client:
        with pytest.raises(RouterError) as refused:
            await client.ensure_subscription("bad", pattern={"type": "x"}, target={"queue": {}})
        assert refused.value.status == 422 and refused.value.problem["errors"][0]["field"].startswith("pattern")
    async with RouterClient(router_process.url, token="wrong") as client:
        with pytest.raises(RouterError) as unauthorized:
            await client.publish(new_event("t", "tests", {}))
        assert unauthorized.value.status == 401


async def test_publish_retries_until_the_router_is_back(tmp_path: Path) -> None:
    router = ServiceProcess("router", free_port(), {"CATTUBE_DATA_DIR": str(tmp_path)})
    async with RouterClient(router.url, retries=30, backoff_max_s=0.5) as client:
        publishing = asyncio.create_task(client.publish(new_event("t", "tests", {}, id="patient")))
        await asyncio.sleep(0.5)
        assert not publishing.done()
        await router.start()
        try:
            result = await asyncio.wait_for(publishing, 30)
            assert result.id == "patient" and not result.duplicate
        finally:
            await router.kill()


async def test_without_retries_an_unreachable_router_is_reported(tmp_path: Path) -> None:
    async with RouterClient(f"http://127.0.0.1:{free_port()}", retries=0) as client:
        with pytest.raises(RouterUnavailable) as unavailable:
            await client.publish(new_event("t", "tests", {}))
        assert unavailable.value.status == 503


async def test_a_receive_abandoned_by_its_client_leases_nothing(router_process: ServiceProcess) -> None:
    async with RouterClient(router_process.url, token="tok") as client:
        await client.ensure_subscription("jobs", pattern={"source": ["tests"]}, target={"queue": {}})
        abandoned = asyncio.create_task(client.queue("jobs").receive(wait_s=10, visibility_timeout_s=300))
        await asyncio.sleep(0.3)
        abandoned.cancel()  # the client hangs up in the middle of the long poll
        with contextlib.suppress(asyncio.CancelledError):
            await abandoned
        await asyncio.sleep(0.3)  # the router notices the disconnect
        await client.publish(new_event("t", "tests", {}, id="for-the-living"))
        # Nobody else was waiting: the event must not be hidden behind a lease for the gone client.
        (message,) = await client.queue("jobs").receive(wait_s=5)
        assert message.event["id"] == "for-the-living" and message.attempt == 1
