"""The SDK's streaming consumer (`QueueConsumer.stream`) and its batched acks, against real router processes,
and a kill -9 of the router mid-stream: unacked messages come back after their visibility timeout, acked
ones never, and the stream reconnects by itself."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from router.client import MessageStream, ReceivedMessage, RouterClient, RouterError, new_event
from tests.process import ServiceProcess, free_port, service

pytestmark = [pytest.mark.slow, pytest.mark.engines]


def count_acks(stream: MessageStream) -> list[int]:
    """The size of each ack request the stream's acker sends."""
    sizes: list[int] = []
    ack = stream.acker.queue.ack

    async def counted(receipts: Any) -> list[dict[str, Any]]:
        sizes.append(len(receipts))
        return await ack(receipts)

    stream.acker.queue.ack = counted  # type: ignore[method-assign]
    return sizes


async def take(stream: MessageStream, count: int) -> list[ReceivedMessage]:
    async with asyncio.timeout(30):  # a hang guard, not a measure
        return [await anext(stream) for _ in range(count)]


async def test_the_sdk_stream_keeps_its_window_and_batches_acks(tmp_path: Path) -> None:
    async with (
        service("router", {"CATTUBE_DATA_DIR": str(tmp_path), "CATTUBE_TOKEN": "tok"}) as router,
        RouterClient(router.url, token="tok") as client,
    ):
        await client.ensure_subscription("work", pattern=None, target={"queue": {}})
        await client.publish_batch([new_event("t", "tests", {"n": i}, id=f"e{i}") for i in range(120)])
        seen: list[str] = []
        async with client.queue("work").stream(prefetch=50) as stream:
            sizes = count_acks(stream)
            for _ in range(3):
                window = await take(stream, min(50, 120 - len(seen)))
                seen += [m.event["id"] for m in window]
                stats = await client.stats("work")
                assert stats.in_flight == len(window)  # never more than prefetch
                for message in window:  # queued together: one request carries them all
                    stream.ack(message)
                await stream.acker.flush()
        assert sizes == [50, 50, 20]
        assert seen == [f"e{i}" for i in range(120)]
        stats = await client.stats("work")
        assert (stats.backlog, stats.in_flight, stats.delivered_total) == (0, 0, 120)


async def test_the_sdk_stream_names_a_refusal(tmp_path: Path) -> None:
    async with (
        service("router", {"CATTUBE_DATA_DIR": str(tmp_path), "CATTUBE_TOKEN": "tok"}) as router,
        RouterClient(router.url, token="tok") as client,
    ):
        with pytest.raises(RouterError) as refused:
            await anext(client.queue("missing").stream())
        assert refused.value.status == 404


async def test_kill_9_mid_stream_brings_back_the_unacked_and_never_the_acked(tmp_path: Path) -> None:
    env = {"CATTUBE_DATA_DIR": str(tmp_path), "CATTUBE_TOKEN": "t"}
    router = ServiceProcess("router", free_port(), env)
    await router.start()
    try:
        async with RouterClient(router.url, token="t", backoff_initial_s=0.05, backoff_max_s=0.5) as client:
            await client.ensure_subscription("work", pattern=None, target={"queue": {}})
            await client.publish_batch([new_event("t", "tests", {"n": i}, id=f"e{i}") for i in range(20)])
            stream = client.queue("work").stream(prefetch=10, visibility_timeout_s=2, heartbeat_s=0.5)
            first = await take(stream, 10)
            acked = {m.event["id"] for m in first[:5]}
            for message in first[:5]:
                stream.ack(message)
            await stream.acker.flush()
            unacked = {m.event["id"] for m in first[5:]}
            await router.kill()
            await router.start()  # same port, same data: the stream reconnects by itself
            later = await take(stream, 15)  # the 10 never sent, and the 5 unacked once their leases expire
            await stream.aclose()
        ids = [m.event["id"] for m in later]
        assert not acked & set(ids)
        assert sorted(ids) == sorted({f"e{i}" for i in range(20)} - acked)
        assert all(m.attempt == 2 for m in later if m.event["id"] in unacked)
    finally:
        await router.kill()
