"""The EventStore contract: every implementation (SQLite and PostgreSQL) passes these tests.

Append a factory to `STORES` and the whole suite runs against it. A factory makes a store on a
database (each test gets a fresh one: a directory for SQLite, a database URL for PostgreSQL, see
the `db` fixture) for a replica id; two stores made from the same database are two replicas on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from router import persistence
from router.cloudevents import encoded
from router.fanout import Fanout, Grant
from router.notifier import Changes, InProcessNotifier
from router.patterns import compile_pattern
from router.persistence import Delivery, EventStore, Message, Settlement, SubscriptionSpec
from router.stores.postgres import PostgresEventStore
from router.stores.sqlite import SQLiteEventStore
from services.common.errors import Conflict

Database = Any
"""Where a store keeps its data: a directory (SQLite) or a database URL (PostgreSQL)."""
StoreFactory = Callable[[Database, str], EventStore]
STORES: dict[str, StoreFactory] = {
    "sqlite": lambda db, replica: SQLiteEventStore(db / "bus.db", replica_id=replica),
    "postgres": lambda db, replica: PostgresEventStore(db, replica_id=replica),
}
T0 = 1_800_000_000_000  # a fixed clock, in ms
DAY_MS = 86_400_000


@dataclass
class Opened:
    """A store as the bus opens it, with what its notifier and fan-out heard."""

    store: EventStore
    fanout: Fanout
    changes: list[Changes] = field(default_factory=list)
    handoffs: list[list[Message]] = field(default_factory=list)


@asynccontextmanager
async def opened(make: StoreFactory, db: Database, replica: str = "replica-a") -> AsyncIterator[Opened]:
    notifier, fanout = InProcessNotifier(), Fanout()
    made = Opened(make(db, replica), fanout)
    notifier.listen(made.changes.append)
    await made.store.open(notifier, fanout)
    try:
        yield made
    finally:
        await made.store.close()


@pytest.fixture(params=list(STORES))
def engine(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def make(engine: str) -> StoreFactory:
    return STORES[engine]


@pytest.fixture
def db(engine: str, request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    """A fresh database for the engine under test (PostgreSQL's server is started once per session)."""
    if engine == "postgres":
        return request.getfixturevalue("database_url")
    return tmp_path


@pytest.fixture
async def bus_store(make: StoreFactory, db: Database) -> AsyncIterator[Opened]:
    async with opened(make, db) as made:
        yield made


@pytest.fixture
def store(bus_store: Opened) -> EventStore:
    return bus_store.store


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
    ids = {name: [m.sequence for m in await receive(store, name, 10, 1000, T0)] for name in ("late", "all", "picky")}
    assert ids == {"late": [2, 3], "all": [1, 2, 3], "picky": [2]}


async def test_put_is_idempotent_and_keeps_secret_and_start(store: EventStore) -> None:
    created, was_created = await store.put_subscription(queue("q"), T0)
    again, created_again = await store.put_subscription(queue("q", {"type": ["x"]}), T0 + 1)
    assert was_created and not created_again
    assert again.secret == created.secret and again.start_sequence == created.start_sequence
    read = await store.get_subscription("q")
    assert read is not None and read.spec.same_as(again.spec)
    assert (read.secret, read.created_at_ms, read.start_sequence) == (again.secret, T0, created.start_sequence)
    assert [s.spec.name for s in await store.list_subscriptions()] == ["q"]


def push(name: str, **delivery: Any) -> SubscriptionSpec:
    """A push subscription to the contract's own events (not to the router's announcements)."""
    pattern = {"source": ["contract"]}
    return SubscriptionSpec(
        name, pattern, compile_pattern(pattern), {"url": "http://127.0.0.1:9/x"}, Delivery(**delivery)
    )


async def receive(store: EventStore, name: str, max_messages: int, hide_ms: int, now_ms: int) -> list[Message]:
    """A queue receive with the default max_receive_count."""
    return await store.receive(name, max_messages, hide_ms, now_ms, Delivery().max_receive_count)


async def test_subscriptions_survive_reopening(make: StoreFactory, db: Database) -> None:
    async with opened(make, db) as first:
        await first.store.put_subscription(queue("q", {"type": ["t"]}), T0)
        await first.store.append([ev("a")], T0)
    async with opened(make, db) as second:
        sub = await second.store.get_subscription("q")
        assert sub is not None and sub.spec.compiled is not None
        await second.store.append([ev("b")], T0)
        assert len(await receive(second.store, "q", 10, 1000, T0)) == 2


async def test_visibility_ack_nack_extend(store: EventStore) -> None:
    await store.put_subscription(queue("q"), T0)
    await store.append([ev("a")], T0)
    (message,) = await receive(store, "q", 10, 1000, T0)
    assert await receive(store, "q", 10, 1000, T0 + 999) == []
    assert await store.next_visible_ms("q", T0) == T0 + 1000
    (extended,) = await store.extend("q", [message.receipt], 5000, T0 + 500)
    assert extended.ok and await receive(store, "q", 10, 1000, T0 + 1500) == []
    (nacked,) = await store.nack("q", [message.receipt], 100, T0 + 600)
    assert nacked.ok
    stats = await store.stats("q", T0 + 650)
    assert (stats.backlog, stats.in_flight, stats.delayed, stats.failed_total) == (0, 0, 1, 1)
    (again,) = await receive(store, "q", 10, 1000, T0 + 700)
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
    await store.receive("q", 1, 10, T0, 1)
    assert await store.receive("q", 1, 10, T0 + 20, 1) == []
    (dead,) = await store.dead_letters("q", 10)
    assert dead.attempts == 1 and dead.sequence == 1
    (announcement,) = await receive(store, "dlq-watch", 10, 1000, T0 + 20)
    assert b"cattube.router.dead-lettered" in announcement.event
    assert await store.redrive("q", T0 + 30) == 1
    (fresh,) = await store.receive("q", 1, 10, T0 + 30, 1)
    assert fresh.attempt == 1
    await store.receive("q", 1, 10, T0 + 50, 1)
    assert await store.purge_dead_letters("q") == 1
    assert (await store.stats("q", T0 + 60)).dead_lettered == 0


async def test_retention_keeps_what_a_queue_still_holds(store: EventStore) -> None:
    await store.put_subscription(queue("q", {"data": {"keep": [True]}}), T0)
    await store.append([ev("held", data={"keep": True}), ev("free", data={"keep": False})], T0)
    # A day later: PostgreSQL keeps events by the day (whole partitions), SQLite by the millisecond.
    assert await store.purge_expired(T0 + DAY_MS) == 1
    assert len(await receive(store, "q", 10, 1000, T0)) == 1
    # A purged id may be published again as new (the dedup window is the retention window).
    (again,) = await store.append([ev("free")], T0 + 2)
    assert not again.duplicate


async def test_a_full_read_parses_only_the_specs_that_changed(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every change to the catalog has the bus read all of it again: an unchanged spec is not parsed again
    (its JSON and its pattern), and the read still answers what is stored now."""
    for name in ("a", "b", "c"):
        await store.put_subscription(queue(name, {"type": [name]}), T0)
    _, before = await store.load_subscriptions()
    parsed: list[str] = []
    real = persistence.spec_from_json

    def counting(name: str, text: str) -> SubscriptionSpec:
        parsed.append(name)
        return real(name, text)

    monkeypatch.setattr(persistence, "spec_from_json", counting)
    _, again = await store.load_subscriptions()
    assert parsed == [] and [s.spec for s in again] == [s.spec for s in before]
    await store.put_subscription(queue("b", {"type": ["b2"]}), T0)
    await store.delete_subscription("c")
    _, now = await store.load_subscriptions()
    assert parsed == ["b"]
    assert [(s.spec.name, s.spec.pattern) for s in now] == [("a", {"type": ["a"]}), ("b", {"type": ["b2"]})]
    assert now[0].spec is before[0].spec and now[1].spec.matches({"type": "b2"})


async def test_creating_past_the_subscription_limit_is_a_conflict_even_from_two_replicas_at_once(
    make: StoreFactory, db: Database
) -> None:
    async with opened(make, db, "replica-a") as a, opened(make, db, "replica-b") as b:
        await a.store.put_subscription(queue("first"), T0, max_subscriptions=3)
        made = await asyncio.gather(
            *((a, b)[n % 2].store.put_subscription(queue(f"s{n}"), T0, max_subscriptions=3) for n in range(6)),
            return_exceptions=True,
        )
        refused = [r for r in made if isinstance(r, Conflict)]
        assert len(refused) == 4 and all("CATTUBE_MAX_SUBSCRIPTIONS=3" in str(r) for r in refused), made
        assert len((await a.store.load_subscriptions())[1]) == 3
        # At the limit, a subscription that exists may still change; once one goes, another may come.
        await b.store.put_subscription(queue("first", {"type": ["x"]}), T0, max_subscriptions=3)
        assert await a.store.delete_subscription("first")
        _, created = await a.store.put_subscription(queue("later"), T0, max_subscriptions=3)
        assert created


async def test_delete_subscription_drops_its_messages(store: EventStore) -> None:
    await store.put_subscription(queue("q"), T0)
    await store.append([ev("a")], T0)
    assert await store.delete_subscription("q")
    assert not await store.delete_subscription("q")
    assert await store.get_subscription("q") is None
    await store.put_subscription(queue("q"), T0)
    assert (await store.stats("q", T0)).backlog == 0


async def test_the_notifier_hears_about_every_queue_change(bus_store: Opened) -> None:
    store, changes = bus_store.store, bus_store.changes
    await store.put_subscription(queue("q"), T0)
    assert changes[-1].catalog
    changes.clear()
    await store.append([ev("a")], T0)
    assert [(c.touched, c.ready, c.hidden_until, c.catalog) for c in changes] == [({"q"}, {"q"}, {}, False)]
    (message,) = await receive(store, "q", 1, 1000, T0)
    assert (changes[-1].touched, changes[-1].hidden_until) == ({"q"}, {"q": T0 + 1000})
    await store.ack("q", [message.receipt], T0)
    assert (changes[-1].touched, changes[-1].hidden_until) == ({"q"}, {})
    changes.clear()
    assert await receive(store, "q", 1, 1000, T0) == []
    assert changes == []  # nothing changed, nobody is woken


async def test_the_change_counter_moves_with_every_change_and_survives_reopening(
    make: StoreFactory, db: Database
) -> None:
    async with opened(make, db) as first:
        await first.store.put_subscription(queue("q"), T0)
        counters = [(await first.store.stats("q", T0)).changes]
        await first.store.append([ev("a")], T0)
        counters.append((await first.store.stats("q", T0)).changes)
        (message,) = await receive(first.store, "q", 1, 1000, T0)
        counters.append((await first.store.stats("q", T0)).changes)
        await first.store.extend("q", [message.receipt], 5000, T0)
        counters.append((await first.store.stats("q", T0)).changes)
        await first.store.append([ev("other-type", type="x")], T0)  # matches, but changes nothing else
        assert counters == sorted(set(counters)), counters
    async with opened(make, db, "replica-b") as second:
        assert (await second.store.stats("q", T0)).changes > counters[-1]


async def test_an_offer_leases_new_events_in_the_append_itself(bus_store: Opened) -> None:
    store, fanout = bus_store.store, bus_store.fanout
    await store.put_subscription(push("hook"), T0)
    grant = Grant("hook", bus_store.handoffs.append)
    fanout.offer(grant, 2, 1000)
    await store.append([ev("a"), ev("b"), ev("c")], T0)
    (handed,) = bus_store.handoffs
    assert [(m.sequence, m.attempt) for m in handed] == [(1, 1), (2, 1)]
    assert fanout.withdraw(grant) == 0 and grant.pending == 0  # both slots were used, and handed over
    assert "hook" in bus_store.changes[-1].ready  # the third is queued the ordinary way
    (third,) = await store.lease("hook", 10, 1000, T0, False)
    assert third.sequence == 3
    # The handed-off ones are leased: settled like any other.
    results = await store.settle("hook", [Settlement(m.receipt, "ack") for m in handed], T0)
    assert all(r.ok for r in results)
    assert not await store.lease("hook", 10, 1000, T0, False)


async def test_queue_messages_handed_to_streams_are_receives_first_attempt(bus_store: Opened) -> None:
    """Two streams of one queue share new events, each leased for its own visibility timeout with attempt 1: acked,
    nacked or expired as if received."""
    store, fanout = bus_store.store, bus_store.fanout
    await store.put_subscription(queue("q"), T0)
    one: list[Message] = []
    two: list[Message] = []
    first, second = Grant("q", one.extend), Grant("q", two.extend)
    fanout.offer(first, 5, 1000)
    fanout.offer(second, 5, 3000)
    await store.append([ev("a"), ev("b"), ev("c"), ev("d")], T0)
    assert [(m.sequence, m.attempt) for m in one] == [(1, 1), (3, 1)]
    assert [(m.sequence, m.attempt) for m in two] == [(2, 1), (4, 1)]
    assert "q" not in bus_store.changes[-1].ready  # nothing for the line: every one was handed off
    assert bus_store.changes[-1].hidden_until["q"] == T0 + 1000
    stats = await store.stats("q", T0)
    assert (stats.backlog, stats.in_flight) == (0, 4)
    assert [r.ok for r in await store.ack("q", [one[0].receipt], T0)] == [True]
    assert [r.ok for r in await store.nack("q", [two[0].receipt], 0, T0)] == [True]
    (again,) = await receive(store, "q", 10, 1000, T0)
    assert (again.sequence, again.attempt) == (2, 2)
    await store.ack("q", [again.receipt], T0)
    expired = await receive(store, "q", 10, 5000, T0 + 1000)  # the first stream's lease ran out; not the second's
    assert [(m.sequence, m.attempt) for m in expired] == [(3, 2)]
    assert [(m.sequence, m.attempt) for m in await receive(store, "q", 10, 1000, T0 + 3000)] == [(4, 2)]
    await store.release("q", [m.receipt for m in expired], T0 + 3000)  # a stream that hung up gives it back
    assert [(m.sequence, m.attempt) for m in await receive(store, "q", 10, 1000, T0 + 3000)] == [(3, 2)]


async def test_a_subscription_made_on_one_replica_is_fanned_out_to_by_another(make: StoreFactory, db: Database) -> None:
    async with opened(make, db, "a") as a, opened(make, db, "b") as b:
        await b.store.append([ev("before")], T0)  # b has read the (empty) subscriptions
        await a.store.put_subscription(queue("q"), T0)
        await b.store.append([ev("after")], T0)
        assert [m.sequence for m in await receive(a.store, "q", 10, 1000, T0)] == [2]
        assert await a.store.delete_subscription("q")
        await b.store.append([ev("gone")], T0)
        assert await b.store.get_subscription("q") is None
        version, subs = await b.store.load_subscriptions()
        assert subs == [] and version == b.fanout.version


async def test_a_receipt_from_one_replica_settles_on_another(make: StoreFactory, db: Database) -> None:
    async with opened(make, db, "a") as a, opened(make, db, "b") as b:
        await a.store.put_subscription(queue("q"), T0)
        await a.store.append([ev("a")], T0)
        (message,) = await receive(a.store, "q", 1, 1000, T0)
        assert await receive(b.store, "q", 1, 1000, T0) == []  # held by a
        (acked,) = await b.store.ack("q", [message.receipt], T0)
        assert acked.ok


async def test_replay_queues_the_range_again_marked_and_counted(store: EventStore) -> None:
    await store.put_subscription(queue("q", {"data": {"k": ["yes"]}}), T0)
    await store.append([ev(f"e{i}", data={"k": "yes" if i != 3 else "no"}) for i in range(1, 6)], T0)
    for message in await receive(store, "q", 10, 1000, T0):
        await store.ack("q", [message.receipt], T0)
    status = await store.replay("q", "again", 2, 4, T0 + 1)
    assert (status.from_sequence, status.to_sequence, status.total, status.pending) == (2, 4, 2, 2)
    replayed = await receive(store, "q", 10, 1000, T0 + 1)
    assert [(m.sequence, m.replay) for m in replayed] == [(2, "again"), (4, "again")]
    assert all(b'"replay":"again"' in m.event for m in replayed)
    await store.ack("q", [replayed[0].receipt], T0 + 2)
    status = await store.replay_status("q", "again")
    assert status is not None and (status.delivered, status.pending, status.dead_lettered) == (1, 1, 0)
    with pytest.raises(Conflict):
        await store.replay("q", "again", 1, 5, T0 + 3)
    assert await store.replay_status("q", "never") is None
    assert await store.sequence_at(T0) == 1 and await store.sequence_at(T0 + 1) == 6


async def test_ordered_leasing_holds_each_key_behind_its_head(store: EventStore) -> None:
    await store.put_subscription(push("hook", ordered=True), T0)
    await store.append(
        [ev("k1-a", partitionkey="k1"), ev("k1-b", partitionkey="k1"), ev("k2-a", partitionkey="k2"), ev("free")],
        T0,
    )
    first = await store.lease("hook", 10, 1000, T0, True)
    assert [m.sequence for m in first] == [1, 3, 4]  # k1's second waits for its head
    assert await store.lease("hook", 10, 1000, T0, True) == []
    head = first[0]
    # A retry keeps the key blocked until the head goes out again and is acked.
    (retried,) = await store.settle("hook", [Settlement(head.receipt, "retry", delay_ms=500, error="HTTP 503")], T0)
    assert retried.ok and await store.lease("hook", 10, 1000, T0 + 100, True) == []
    (again,) = await store.lease("hook", 10, 1000, T0 + 500, True)
    assert (again.sequence, again.attempt) == (1, 2)
    await store.settle("hook", [Settlement(again.receipt, "ack")], T0 + 600)
    (second,) = await store.lease("hook", 10, 1000, T0 + 600, True)
    assert second.sequence == 2
    # Unordered leasing of the same queue does not hold keys back.
    await store.append([ev("k3-a", partitionkey="k3"), ev("k3-b", partitionkey="k3")], T0 + 700)
    assert [m.sequence for m in await store.lease("hook", 10, 1000, T0 + 700, False)] == [5, 6]


async def test_settlement_acks_retries_and_dead_letters_in_one_call(store: EventStore) -> None:
    await store.put_subscription(push("hook"), T0)
    await store.put_subscription(queue("dlq-watch", {"type": ["cattube.router.dead-lettered"]}), T0)
    await store.append([ev("ok"), ev("later"), ev("never")], T0)
    ok, later, never = await store.lease("hook", 10, 1000, T0, False)
    context = {"limit": "permanent", "status": 410}
    results = await store.settle(
        "hook",
        [
            Settlement(ok.receipt, "ack"),
            Settlement(later.receipt, "retry", delay_ms=2000, error="HTTP 503"),
            Settlement(never.receipt, "dead", error="HTTP 410 (a permanent failure)", context=context),
            Settlement("999.stale", "ack"),
        ],
        T0 + 10,
    )
    assert [r.ok for r in results] == [True, True, True, False] and results[3].error
    stats = await store.stats("hook", T0 + 20)
    assert (stats.backlog, stats.delayed, stats.dead_lettered) == (0, 1, 1)
    assert (stats.delivered_total, stats.failed_total) == (1, 2)
    assert await store.next_visible_ms("hook", T0 + 20) == T0 + 2010
    (dead,) = await store.dead_letters("hook", 10)
    assert (dead.sequence, dead.last_error, dead.context) == (3, "HTTP 410 (a permanent failure)", context)
    (announcement,) = await receive(store, "dlq-watch", 10, 1000, T0 + 20)
    assert b'"event_id":"never"' in announcement.event.replace(b" ", b"")
    # A settled receipt is spent.
    (spent,) = await store.settle("hook", [Settlement(ok.receipt, "ack")], T0 + 30)
    assert not spent.ok


async def test_lease_release_frees_only_this_replicas_leases(make: StoreFactory, db: Database) -> None:
    async with opened(make, db, "a") as a, opened(make, db, "b") as b:
        await a.store.put_subscription(push("hook"), T0)
        await a.store.append([ev("x"), ev("y")], T0)
        (held_by_a,) = await a.store.lease("hook", 1, 10_000, T0, False)
        (held_by_b,) = await b.store.lease("hook", 1, 10_000, T0, False)
        # b's dispatcher starting up must not take a's live lease, nor a b's.
        assert await b.store.release_leases("hook", T0 + 1) == 1
        assert await a.store.release_leases("hook", T0 + 2) == 1
        assert await a.store.release_leases("hook", T0 + 3) == 0
        again = await a.store.lease("hook", 10, 10_000, T0 + 4, False)
        assert sorted(m.sequence for m in again) == sorted([held_by_a.sequence, held_by_b.sequence])
        assert all(m.attempt == 2 for m in again)


async def test_a_dead_replicas_leases_are_taken_over_after_they_expire(make: StoreFactory, db: Database) -> None:
    async with opened(make, db, "dead") as dead:
        await dead.store.put_subscription(push("hook"), T0)
        await dead.store.append([ev("x")], T0)
        (leased,) = await dead.store.lease("hook", 1, 10_000, T0, False)
    async with opened(make, db, "new") as new:
        assert await new.store.release_leases("hook", T0 + 1) == 0  # another holder's live lease stays
        assert await new.store.lease("hook", 10, 10_000, T0 + 1, False) == []
        assert await new.store.next_visible_ms("hook", T0 + 1) == T0 + 10_000
        (taken,) = await new.store.lease("hook", 10, 10_000, T0 + 10_000, False)
        assert (taken.sequence, taken.attempt) == (leased.sequence, 2)
        # The old holder's receipt no longer settles anything.
        (late,) = await new.store.settle("hook", [Settlement(leased.receipt, "ack")], T0 + 10_001)
        assert not late.ok
        (done,) = await new.store.settle("hook", [Settlement(taken.receipt, "ack")], T0 + 10_001)
        assert done.ok


async def test_oldest_age_counts_ready_and_hidden_messages(store: EventStore) -> None:
    await store.put_subscription(queue("q"), T0)
    await store.append([ev("first")], T0)
    await store.append([ev("second")], T0 + 2000)
    assert (await store.stats("q", T0 + 5000)).oldest_age_s == 5.0
    (first,) = await receive(store, "q", 1, 60_000, T0 + 5000)  # the oldest is now hidden, still counted
    stats = await store.stats("q", T0 + 6000)
    assert (stats.backlog, stats.in_flight, stats.oldest_age_s) == (1, 1, 6.0)
    await store.ack("q", [first.receipt], T0 + 6000)
    assert (await store.stats("q", T0 + 6000)).oldest_age_s == 4.0
