"""The router's WAL stays bounded under sustained load, and nothing acknowledged is lost on the way.

Continuous publishing, receiving + acking and push delivery against a real router process with a
1 MiB WAL limit. Without a bound, PASSIVE checkpoints never restart the WAL while writers keep
coming, and it grows for as long as the load lasts (issue 10: 107 MB to 449 MB in 25 s).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from router.client import RouterClient, new_event
from tests.process import service
from tests.router.receiver import Receiver

pytestmark = [
    pytest.mark.slow,
    pytest.mark.sqlite,
    pytest.mark.timeout(600),
]  # ~35 s quiet; a loaded machine takes longer

LIMIT_BYTES = 1024 * 1024
EVENTS = 25_000
"""About 20 s of load on this machine when quiet; a count, not a duration, so a busy machine proves the same."""
PUBLISHERS = 2
BATCH = 20
CONSUMERS = 3


async def test_wal_stays_bounded_under_sustained_load_and_nothing_is_lost(tmp_path: Path) -> None:
    receiver = Receiver()
    await receiver.start()
    env = {"CATTUBE_DATA_DIR": str(tmp_path), "CATTUBE_WAL_LIMIT_BYTES": str(LIMIT_BYTES)}
    wal = tmp_path / "router" / "bus.db-wal"
    try:
        async with service("router", env) as router, RouterClient(router.url) as client:
            await client.ensure_subscription("q", pattern={"source": ["load"]}, target={"queue": {}})
            await client.ensure_subscription("hook", pattern={"source": ["load"]}, target={"url": receiver.url})
            published: set[str] = set()
            acked: set[str] = set()
            publishing_done = asyncio.Event()

            async def publish(worker: int) -> None:
                for n in range(0, EVENTS // PUBLISHERS, BATCH):
                    ids = [f"{worker}-{n + i}" for i in range(BATCH)]
                    events = [new_event("t", "load", {"pad": "x" * 512}, id=i) for i in ids]
                    await client.publish_batch(events)
                    published.update(ids)  # acknowledged by the router: these must all arrive

            async def consume() -> None:
                queue = client.queue("q")
                while not (publishing_done.is_set() and acked >= published):
                    messages = await queue.receive(max_messages=10, wait_s=1)
                    if messages:
                        await queue.ack([m.receipt for m in messages])
                        acked.update(m.event["id"] for m in messages)

            consumers = [asyncio.create_task(consume()) for _ in range(CONSUMERS)]
            await asyncio.gather(*(publish(w) for w in range(PUBLISHERS)))
            publishing_done.set()
            await asyncio.wait_for(asyncio.gather(*consumers), 120)
            await receiver.wait_for(len(published), timeout_s=120)
            pushed = {json.loads(d.body)["id"] for d in receiver.deliveries}
            wal_bytes = wal.stat().st_size if wal.exists() else 0
    finally:
        await receiver.stop()
    assert len(published) == EVENTS
    assert acked == published and pushed == published
    assert wal_bytes <= 8 * LIMIT_BYTES, f"WAL at {wal_bytes} bytes after {len(published)} events"
