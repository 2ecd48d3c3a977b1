"""The EventStore contract: every implementation (SQLite now, PostgreSQL later) passes these tests.

Add an implementation to `STORES` and the whole suite runs against it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from router.cloudevents import encoded
from router.patterns import compile_pattern
from router.persistence import Delivery, EventStore, Settlement, SubscriptionSpec
from router.stores.sqlite import SQLiteEventStore

STORES: dict[str, Callable[[Path], EventStore]] = {
    "sqlite": lambda tmp: SQLiteEventStore(tmp / "bus.db"),
}
T0 = 1_800_000_000_000  # a fixed clock, in ms


@pytest.fixture(params=sorted(STORES))
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[EventStore]:
    made = STORES[request.param](tmp_path)
    changes: list[tuple[set[str], dict[str, int]]] = []
    made.listener = lambda touched, hidden, handoffs: changes.append((touched, hidden))
    await made.open()
    try:
        yield made
    finally:
        await made.close()


def ev(id: str, **fields: Any) -> Any:
    return encoded({"specversion": "1.0", "id": id, "source": "contract", "type": "t", **fields})


def queue(
    name: str, pattern: dict[str, Any] | None = None, start: str | int = "latest", **delivery: Any
) -> SubscriptionSpec:
    return SubscriptionSpec(
        name, pattern, compile_pattern(pattern) if pattern else None, {"queue": {}}, Delivery(**delivery), start
    )


async def test_append_numbers_events_and_recognizes_repeats(store: EventStore) -> None:
    first = await store.append([ev("a"), ev("b")], T0)
    again = await store.append([ev("a")], T0)
    assert [(r.id, r.sequence, r.duplicate) for r in first] == [("a", 1, False), ("b", 2, False)]
    assert [(r.id, r.sequence, r.duplicate) for r in again] == [("a", 1, True)]


async def test_fan_out_follows_patterns_and_start_positions(store: EventStore) -> None:
    await store.append([ev("old")], T0)
    await store.put_subscription(queue("late", start="latest"), T0)
    await store.put_subscription(queue("all", start="earliest"), T0)
    await store.put_subscription(queue("picky", {"data": {"k": ["yes"]}}, start="earliest"), T0)
    await store.append([ev("new", data={"k": "yes"}), ev("other", data={"k": "no"})], T0)
    ids = {name: [m.sequence for m in await store.receive(name, 10, 1000, T0)] for name in ("late", "all", "picky")}
    assert ids == {"late": [2, 3], "all": [1, 2, 3], "picky": [2]}


async def test_put_is_idempotent_and_keeps_secret_and_start(store: EventStore) -> None:
    created, was_created = await store.put_subscription(queue("q"), T0)
    again, created_again = await store.put_subscription(queue("q", {"type": ["x"]}), T0 + 1)
    assert was_created and not created_again
    assert again.secret == created.secret and again.start_sequence == created.start_sequence
    assert (await store.get_subscription("q")) == again
    assert [s.spec.name for s in await store.list_subscriptions()] == ["q"]


async def test_subscriptions_survive_reopening(tmp_path: Path) -> None:
    for name, make in STORES.items():
        first = make(tmp_path / name)
        await first.open()
        await first.put_subscription(queue("q", {"type": ["t"]}), T0)
        await first.append([ev("a")], T0)
        await first.close()
        second = make(tmp_path / name)
        await second.open()
        try:
            sub = await second.get_subscription("q")
            assert sub is not None and sub.spec.compiled is not None
            await second.append([ev("b")], T0)
            assert len(await second.receive("q", 10, 1000, T0)) == 2
        finally:
            await second.close()


async def test_visibility_ack_nack_extend(store: EventStore) -> None:
    await store.put_subscription(queue("q"), T0)
    await store.append([ev("a")], T0)
    (message,) = await store.receive("q", 10, 1000, T0)
    assert await store.receive("q", 10, 1000, T0 + 999) == []
    assert await store.next_visible_ms("q", T0) == T0 + 1000
    (extended,) = await store.extend("q", [message.receipt], 5000, T0 + 500)
    assert extended.ok and await store.receive("q", 10, 1000, T0 + 1500) == []
    (nacked,) = await store.nack("q", [message.receipt], 100, T0 + 600)
    assert nacked.ok
    stats = await store.stats("q", T0 + 650)
    assert (stats.backlog, stats.in_flight, stats.delayed, stats.failed_total) == (0, 0, 1, 1)
    (again,) = await store.receive("q", 10, 1000, T0 + 700)
    assert again.attempt == 2
    (acked,) = await store.ack("q", [again.receipt], T0 + 800)
    (stale,) = await store.ack("q", [message.receipt], T0 + 800)
    assert acked.ok and not stale.ok and stale.error
    stats = await store.stats("q", T0 + 800)
    assert (stats.backlog, stats.in_flight, stats.delivered_total) == (0, 0, 1)


async def test_max_receive_count_dead_letters_redrive_purge(store: EventStore) -> None:
    await store.put_subscription(queue("q", {"source": ["contract"]}, max_receive_count=1), T0)
    await store.put_subscription(queue("dlq-watch", {"type": ["cattube.router.dead-lettered"]}), T0)
    await store.append([ev("a")], T0)
    await store.receive("q", 1, 10, T0)
    assert await store.receive("q", 1, 10, T0 + 20) == []
    (dead,) = await store.dead_letters("q", 10)
    assert dead.attempts == 1 and dead.sequence == 1
    (announcement,) = await store.receive("dlq-watch", 10, 1000, T0 + 20)
    assert b"cattube.router.dead-lettered" in announcement.event
    assert await store.redrive("q", T0 + 30) == 1
    (fresh,) = await store.receive("q", 1, 10, T0 + 30)
    assert fresh.attempt == 1
    await store.receive("q", 1, 10, T0 + 50)
    assert await store.purge_dead_letters("q") == 1
    assert (await store.stats("q", T0 + 60)).dead_lettered == 0


async def test_retention_keeps_what_a_queue_still_holds(store: EventStore) -> None:
    await store.put_subscription(queue("q", {"data": {"keep": [True]}}), T0)
    await store.append([ev("held", data={"keep": True}), ev("free", data={"keep": False})], T0)
    assert await store.purge_expired(T0 + 1) == 1
    assert len(await store.receive("q", 10, 1000, T0)) == 1
    # A purged id may be published again as new (the dedup window is the retention window).
    (again,) = await store.append([ev("free")], T0 + 2)
    assert not again.duplicate


async def test_delete_subscription_drops_its_messages(store: EventStore) -> None:
    await store.put_subscription(queue("q"), T0)
    await store.append([ev("a")], T0)
    assert await store.delete_subscription("q")
    assert not await store.delete_subscription("q")
    assert await store.get_subscription("q") is None
    await store.put_subscription(queue("q"), T0)
    assert (await store.stats("q", T0)).backlog == 0


async def test_the_listener_hears_about_every_queue_change(tmp_path: Path) -> None:
    store = SQLiteEventStore(tmp_path / "bus.db")
    changes: list[tuple[set[str], dict[str, int]]] = []
    store.listener = lambda touched, hidden, handoffs: changes.append((set(touched), dict(hidden)))
    await store.open()
    try:
        await store.put_subscription(queue("q"), T0)
        changes.clear()
        await store.append([ev("a")], T0)
        assert changes == [({"q"}, {})]
        (message,) = await store.receive("q", 1, 1000, T0)
        assert changes[-1] == ({"q"}, {"q": T0 + 1000})
        await store.ack("q", [message.receipt], T0)
        assert changes[-1] == ({"q"}, {})
    finally:
        await store.close()


async def test_an_offer_leases_new_events_in_the_append_itself(store: EventStore) -> None:
    handed: list[dict[str, list[Any]]] = []
    store.listener = lambda touched, hidden, handoffs: handed.append(handoffs)
    push = SubscriptionSpec("hook", None, None, {"url": "http://127.0.0.1:9/x"}, Delivery())
    await store.put_subscription(push, T0)
    store.offer("hook", 2, 1000)
    await store.append([ev("a"), ev("b"), ev("c")], T0)
    (handoffs,) = [h for h in handed if h]
    assert [(m.sequence, m.attempt) for m in handoffs["hook"]] == [(1, 1), (2, 1)]
    assert store.withdraw("hook") == 0  # both slots were used
    assert store.may_have_ready("hook")  # the third is queued the ordinary way
    (third,) = await store.lease("hook", 10, 1000, T0)
    assert third.sequence == 3
    # The handed-off ones are leased: settled like any other.
    results = await store.settle("hook", [Settlement(m.receipt, "ack") for m in handoffs["hook"]], T0)
    assert all(r.ok for r in results)
    assert store.withdraw("hook") == 0 and not (await store.lease("hook", 10, 1000, T0))


async def test_oldest_age_counts_ready_and_hidden_messages(store: EventStore) -> None:
    await store.put_subscription(queue("q"), T0)
    await store.append([ev("first")], T0)
    await store.append([ev("second")], T0 + 2000)
    assert (await store.stats("q", T0 + 5000)).oldest_age_s == 5.0
    (first,) = await store.receive("q", 1, 60_000, T0 + 5000)  # the oldest is now hidden, still counted
    stats = await store.stats("q", T0 + 6000)
    assert (stats.backlog, stats.in_flight, stats.oldest_age_s) == (1, 1, 6.0)
    await store.ack("q", [first.receipt], T0 + 6000)
    assert (await store.stats("q", T0 + 6000)).oldest_age_s == 4.0
