"""kill -9 of a real router process: nothing acknowledged is lost, every unacked message comes back."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from router.client import RouterClient, RouterError, new_event
from tests.process import ServiceProcess, free_port

pytestmark = [pytest.mark.slow, pytest.mark.engines]


@pytest.mark.parametrize("durability", ["fsync", "batched"])
async def test_kill_9_under_concurrent_publishing_loses_nothing_acknowledged(tmp_path: Path, durability: str) -> None:
    # `batched` answers before the WAL's fsync (within a second): a crash of the process must lose nothing all the same.
    env = {"CATTUBE_DATA_DIR": str(tmp_path), "CATTUBE_TOKEN": "t", "CATTUBE_ROUTER_DURABILITY": durability}
    router = ServiceProcess("router", free_port(), env)
    await router.start()
    acknowledged: dict[str, int] = {}
    enough = asyncio.Event()

    async with RouterClient(router.url, token="t", retries=0) as client:
        await client.ensure_subscription("work", pattern={"source": ["crash-test"]}, target={"queue": {}})
        # Some queue state from before the crash: two messages acked, one received but not acked.
        await client.publish_batch([new_event("t", "crash-test", {"n": i}, id=f"pre{i}") for i in range(3)])
        queue = client.queue("work")
        received = await queue.receive(max_messages=3, wait_s=1, visibility_timeout_s=1)
        assert len(received) == 3
        await queue.ack([m.receipt for m in received[:2]])
        unacked_id = received[2].event["id"]

        async def publisher(worker: int) -> None:
            for i in range(10_000):
                event = new_event("t", "crash-test", {"worker": worker, "i": i}, id=f"w{worker}-{i}")
                try:
                    result = await client.publish(event)
                except (RouterError, httpx.HTTPError):
                    return  # the router died under us: whatever was not answered may or may not be there
                acknowledged[result.id] = result.sequence
                if len(acknowledged) >= 500:
                    enough.set()

        publishers = [asyncio.create_task(publisher(w)) for w in range(16)]
        await asyncio.wait_for(enough.wait(), 60)
        await router.kill()
        await asyncio.gather(*publishers)

    assert len(acknowledged) >= 500
    await router.start()
    try:
        async with RouterClient(router.url, token="t") as client:
            # Every acknowledged event is still there: publishing it again is a duplicate with the same sequence.
            ids = sorted(acknowledged)
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                results = await client.publish_batch([new_event("t", "crash-test", {}, id=i) for i in chunk])
                for result in results:
                    assert result.duplicate, f"{result.id} was acknowledged before the crash and is gone"
                    assert result.sequence == acknowledged[result.id]
            # The queue: acked messages stay gone, the unacked one comes back, each published event once.
            queue = client.queue("work")
            seen: list[str] = []
            while batch := await queue.receive(max_messages=10, wait_s=2, visibility_timeout_s=60):
                seen.extend(m.event["id"] for m in batch)
                await queue.ack([m.receipt for m in batch])
            assert "pre0" not in seen and "pre1" not in seen
            assert unacked_id in seen
            assert len(seen) == len(set(seen))
            assert set(acknowledged) <= set(seen)
    finally:
        await router.kill()


async def test_sigterm_drains_and_exits_cleanly(tmp_path: Path) -> None:
    router = ServiceProcess("router", free_port(), {"CATTUBE_DATA_DIR": str(tmp_path)})
    await router.start()
    async with RouterClient(router.url) as client:
        await client.ensure_subscription("q", pattern=None, target={"queue": {}})
        long_poll = asyncio.create_task(client.queue("q").receive(wait_s=20))
        await asyncio.sleep(0.2)
        code = await asyncio.wait_for(router.stop(), 10)  # the long poll must not hold shutdown up for 20 s
        # uvicorn re-raises the signal after a graceful shutdown, so the exit status is -SIGTERM.
        assert code in (0, -signal.SIGTERM)
        assert any("Application shutdown complete" in line for line in router.log)
        assert await long_poll == []


async def test_kill_9_with_messages_handed_to_a_stream_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """Messages leased to a waiting stream in their append's transaction (router.fanout) survive a kill -9 as leases:
    the acked ones stay gone, the others come again once their visibility timeout passes, as the next attempt."""
    env = {"CATTUBE_DATA_DIR": str(tmp_path), "CATTUBE_TOKEN": "t"}
    router = ServiceProcess("router", free_port(), env)
    await router.start()
    headers = {"Authorization": "Bearer t"}
    try:
        async with httpx.AsyncClient(base_url=router.url, headers=headers, timeout=30) as http:
            async with RouterClient(router.url, token="t", retries=0) as client:
                await client.ensure_subscription("work", pattern={"source": ["crash-test"]}, target={"queue": {}})
                body = {"prefetch": 100, "visibility_timeout_s": 2, "heartbeat_s": 0.05}
                async with http.stream("POST", "/subscriptions/work/stream", json=body) as response:
                    lines = response.aiter_lines()
                    assert json.loads(await anext(lines)) == {"heartbeat": True}  # it waits, its slots offered
                    streamed: list[dict[str, Any]] = []
                    for i in range(20):
                        await client.publish(new_event("t", "crash-test", {"i": i}, id=f"e{i}"))
                        while len(streamed) <= i:
                            item = json.loads(await anext(lines))
                            if "heartbeat" not in item:
                                streamed.append(item)
                    assert [(m["event"]["id"], m["attempt"]) for m in streamed] == [(f"e{i}", 1) for i in range(20)]
                    acked = await client.queue("work").ack([m["receipt"] for m in streamed[:10]])
                    assert all(r["ok"] for r in acked)
                    await router.kill()
        await router.start()
        async with RouterClient(router.url, token="t") as client:
            queue = client.queue("work")
            again: list[tuple[str, int]] = []
            async with asyncio.timeout(30):
                while len(again) < 10:
                    batch = await queue.receive(max_messages=10, wait_s=5, visibility_timeout_s=60)
                    again.extend((m.event["id"], m.attempt) for m in batch)
                    await queue.ack([m.receipt for m in batch])
            assert sorted(again) == sorted((f"e{i}", 2) for i in range(10, 20))
            assert await queue.receive(max_messages=10, wait_s=0.5) == []
    finally:
        await router.kill()
