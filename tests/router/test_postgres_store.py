"""What only the PostgreSQL store has to get right: several writers at once on one database.

The contract suite (test_store_contract.py) holds for it as for SQLite; these tests add what a
single-writer engine cannot show: an event that commits late, two replicas claiming at once, replicas
starting at once, the sessions' limits, and retention by whole days.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import asyncpg
import pytest

from router.fanout import Fanout
from router.notifier import InProcessNotifier
from router.persistence import Settlement
from router.receipts import message_id_of, nonce_of
from router.stores.postgres import PostgresEventStore, queues
from router.stores.postgres.partitions import DAY_MS, partition_name
from router.stores.postgres.schema import MIGRATIONS, SCHEMA
from tests.router.test_store_contract import T0, ev, push, queue, receive


@asynccontextmanager
async def opened(url: str, replica: str = "a") -> AsyncIterator[PostgresEventStore]:
    store = PostgresEventStore(url, replica_id=replica)
    await store.open(InProcessNotifier(), Fanout())
    try:
        yield store
    finally:
        await store.close()


@pytest.mark.parametrize(("start", "expected"), [("earliest", [1, 2, 3, 4]), ("latest", [2, 4]), (2, [2, 3, 4])])
async def test_an_event_committed_late_is_not_skipped_by_a_new_subscription(
    database_url: str, start: str | int, expected: list[int]
) -> None:
    async with opened(database_url, "a") as a, opened(database_url, "b") as b:
        await a.append([ev("first")], T0)  # seq 1
        # b appends "late" (seq 2) through the store's own path, and holds its transaction open: it has read the
        # catalog, which has no subscription yet.
        async with b._transaction() as held:
            await b._append_in(held, [ev("late")], T0)
            await a.append([ev("third")], T0)  # seq 3, committed before the subscription
            await a.put_subscription(queue("q", start=start), T0)
            await a.append([ev("fourth")], T0)  # seq 4, fanned out to q by its appender
            # The horizon has not passed b's transaction: the catch-up waits rather than read past it.
            assert await a.catch_up() == []
            assert 2 not in [m.sequence for m in await receive(a, "q", 10, 0, T0)]
        await a.catch_up()  # b has committed: q gets what b's append could not give it (here, or already)
        assert await a.catch_up() == []  # and only once
        assert sorted(m.sequence for m in await receive(a, "q", 10, 1000, T0)) == expected


async def test_an_appender_that_began_after_the_creation_and_committed_after_it_is_not_skipped(
    database_url: str,
) -> None:
    """The catch-up's bound must exceed every transaction id taken before the creation committed. An appender
    that takes its id after the creation's and reads the catalog before the creation commits, and is still
    running when the bound is set, has an id above the last completed one: `pg_snapshot_xmax` (the last
    completed id + 1) did not bound it, and its event was lost (seen in CI as a whole batch never received)."""
    async with opened(database_url, "a") as a, opened(database_url, "b") as b:
        await a.append([ev("first")], T0)
        blocker = await asyncpg.connect(database_url, server_settings={"search_path": SCHEMA})
        try:
            # A row the creation deletes (what an earlier namesake left), locked: the creation stops there with
            # its transaction id taken and the catalog's new version not yet committed.
            await blocker.execute("INSERT INTO counters (sub, shard) VALUES ('q', 0)")
            await blocker.execute("BEGIN; SELECT 1 FROM counters WHERE sub = 'q' FOR UPDATE")
            creating = asyncio.create_task(a.put_subscription(queue("q", start="earliest"), T0))
            await until_waiting_on_a_lock(blocker)
            async with b._transaction() as held:  # a transaction id above the creation's
                await b._append_in(held, [ev("late")], T0)  # reads the catalog without q
                await blocker.execute("COMMIT")
                await creating  # committed, and its catch-up bounded, while b's append still runs
            await a.append([ev("after")], T0)
        finally:
            await blocker.close()
        await a.catch_up()
        assert sorted(json.loads(m.event)["id"] for m in await receive(a, "q", 10, 1000, T0)) == [
            "after", "first", "late",
        ]  # fmt: skip


async def until_waiting_on_a_lock(conn: asyncpg.Connection) -> None:
    """Until another session of this database waits for a lock (a test-only wait: asked every 10 ms, bounded)."""
    for _ in range(1000):
        waiting = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        if waiting:
            return
        await asyncio.sleep(0.01)
    raise TimeoutError("nobody waited for the lock")


async def test_the_catch_up_runs_by_itself_when_the_late_appender_commits(database_url: str) -> None:
    async with opened(database_url, "a") as a, opened(database_url, "b") as b:
        ready = asyncio.Event()  # q got messages visible now: set by the notifier, on this replica
        a._notifier.listen(lambda changes: ready.set() if "q" in changes.ready else None)  # type: ignore[union-attr]
        await a.append([ev("first")], T0)
        async with b._transaction() as held:
            await b._append_in(held, [ev("late")], T0)
            await a.put_subscription(queue("q", start="earliest"), T0)
        # The late commit is b's, which a does not hear of here; a's own commits (its put, any append) wake its
        # catch-up, which finds the horizon past b now.
        await a.append([ev("later")], T0)
        async with asyncio.timeout(10):
            while True:
                ready.clear()  # before the read: a catch-up committing after it still wakes the wait
                seqs = sorted(m.sequence for m in await receive(a, "q", 10, 0, T0))
                if seqs == [1, 2, 3]:
                    break
                await ready.wait()


async def test_two_replicas_leasing_an_ordered_subscription_at_once_keep_each_keys_order(database_url: str) -> None:
    keys = [f"k{i}" for i in range(6)]
    per_key = 15
    async with opened(database_url, "a") as a, opened(database_url, "b") as b:
        await a.put_subscription(push("hook", ordered=True), T0)
        events = [ev(f"{key}-{n}", partitionkey=key) for n in range(per_key) for key in keys]
        random.Random(7).shuffle(events)  # keys interleaved; each key's order is its order in the log
        appended = await a.append(events, T0)
        order = defaultdict(list)
        for (event, _), result in zip(events, appended, strict=True):
            order[event["partitionkey"]].append(result.sequence)
        in_flight: set[str] = set()
        delivered: dict[str, list[int]] = defaultdict(list)
        rng = random.Random(11)

        async def worker(store: PostgresEventStore) -> None:
            while sum(len(d) for d in delivered.values()) < len(events):
                leased = await store.lease("hook", 4, 60_000, T0, True)
                outcomes = []
                for message in leased:
                    key = next(k for k, seqs in order.items() if message.sequence in seqs)
                    assert key not in in_flight, f"{key} is in flight twice"
                    in_flight.add(key)
                    await asyncio.sleep(0)  # the other replica gets its turn while this one "delivers"
                    in_flight.discard(key)  # before the outcome commits: from then on the next may go
                    if rng.random() < 0.2:  # a failed attempt: retried at once, still ahead of its key
                        outcomes.append(Settlement(message.receipt, "retry", delay_ms=0, error="HTTP 503"))
                    else:
                        delivered[key].append(message.sequence)
                        outcomes.append(Settlement(message.receipt, "ack"))
                assert all(r.ok for r in await store.settle("hook", outcomes, T0))
                await asyncio.sleep(0)

        async with asyncio.timeout(60):
            await asyncio.gather(worker(a), worker(b))
        assert delivered == order


async def test_competing_receivers_on_two_replicas_never_hold_one_message_at_once(database_url: str) -> None:
    async with opened(database_url, "a") as a, opened(database_url, "b") as b:
        await a.put_subscription(queue("q"), T0)
        await a.append([ev(f"e{i}") for i in range(300)], T0)
        got: list[int] = []

        async def consume(store: PostgresEventStore) -> None:
            while batch := await receive(store, "q", 7, 60_000, T0):
                got.extend(m.sequence for m in batch)

        await asyncio.gather(*[consume(store) for store in (a, b, a, b)])
        assert sorted(got) == list(range(1, 301))


async def test_replicas_starting_at_once_make_the_schema_once(database_url: str) -> None:
    stores = [PostgresEventStore(database_url, replica_id=f"r{i}") for i in range(4)]
    await asyncio.gather(*[store.open(InProcessNotifier(), Fanout()) for store in stores])
    try:
        assert all(store.connected.is_set() for store in stores)
        conn = await asyncpg.connect(database_url)
        try:
            versions = await conn.fetch("SELECT version FROM router.schema_version ORDER BY version")
        finally:
            await conn.close()
        assert [row["version"] for row in versions] == list(range(1, len(MIGRATIONS) + 1))
    finally:
        await asyncio.gather(*[store.close() for store in stores])


async def test_the_routers_sessions_carry_their_timeouts(database_url: str) -> None:
    async with opened(database_url) as store:
        async with store._connection() as conn:
            settings = {
                name: await conn.fetchval(f"SHOW {name}")
                for name in ("statement_timeout", "idle_in_transaction_session_timeout", "search_path")
            }
    assert settings == {
        "statement_timeout": "30s",
        "idle_in_transaction_session_timeout": "1min",
        "search_path": "router",
    }


async def test_messages_are_vacuumed_by_their_own_settings(database_url: str) -> None:
    async with opened(database_url) as store:
        async with store._connection() as conn:
            options = await conn.fetchval("SELECT reloptions FROM pg_class WHERE oid = 'router.messages'::regclass")
    assert "autovacuum_vacuum_scale_factor=0.01" in options and "autovacuum_vacuum_cost_delay=0" in options


async def test_retention_drops_a_day_nothing_refers_to_and_thins_one_something_does(database_url: str) -> None:
    async with opened(database_url) as store:
        await store.put_subscription(queue("q", {"data": {"keep": [True]}}), T0)
        await store.append([ev("old", data={"keep": False}), ev("old-held", data={"keep": True})], T0)
        await store.append([ev("next", data={"keep": False})], T0 + DAY_MS)
        old_day, next_day = partition_name(T0 // DAY_MS), partition_name(T0 // DAY_MS + 1)

        async def tables() -> set[str]:
            async with store._connection() as conn:
                rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'router'")
            return {row["tablename"] for row in rows}

        async def keys() -> set[str]:
            async with store._connection() as conn:
                return {row["id"] for row in await conn.fetch("SELECT id FROM event_ids")}

        assert {old_day, next_day} <= await tables()
        # Two days later: the first day is held by q's message, so it is thinned, not dropped; the second goes.
        assert await store.purge_expired(T0 + 3 * DAY_MS) == 2
        assert old_day in await tables() and next_day not in await tables()
        assert await keys() == {"old-held"}
        (held,) = await receive(store, "q", 10, 1000, T0)
        await store.ack("q", [held.receipt], T0)
        assert await store.purge_expired(T0 + 3 * DAY_MS) == 1
        assert old_day not in await tables() and await keys() == set()
        # Appends to a day that has no partition yet make it first.
        (again,) = await store.append([ev("old")], T0)
        assert not again.duplicate


async def test_stats_are_read_from_counters_that_match_the_rows(database_url: str) -> None:
    async with opened(database_url, "a") as a, opened(database_url, "b") as b:
        await a.put_subscription(queue("q", {"source": ["contract"]}), T0)
        await a.append([ev(f"e{i}") for i in range(50)], T0)
        first = await receive(a, "q", 10, 1000, T0)
        second = await receive(b, "q", 10, 1000, T0)
        await b.ack("q", [m.receipt for m in first[:5]], T0)
        await a.nack("q", [m.receipt for m in second[:3]], 0, T0)
        # With a limit of 1, the 3 nacked ones (first in line) are dead-lettered, and 10 more received.
        assert len(await a.receive("q", 10, 60_000, T0 + 2000, 1)) == 10
        stats = await b.stats("q", T0 + 3000)
        async with a._connection() as conn:
            rows = await conn.fetchval("SELECT count(*) FROM messages WHERE sub = 'q'")
            dead = await conn.fetchval("SELECT count(*) FROM dead_letters WHERE sub = 'q'")
        assert stats.backlog + stats.in_flight + stats.delayed == rows
        assert stats.dead_lettered == dead
        assert (stats.delivered_total, stats.in_flight, stats.dead_lettered, stats.backlog) == (5, 10, 3, 32)
        assert all(type(n) is int for n in (stats.backlog, stats.delivered_total, stats.failed_total, stats.changes))


async def test_puts_and_deletes_of_one_name_on_two_replicas_at_once_all_succeed(database_url: str) -> None:
    async with opened(database_url, "a") as a, opened(database_url, "b") as b:
        await a.append([ev("e")], T0)

        async def churn(store: PostgresEventStore, rounds: int) -> None:
            for _ in range(rounds):
                await store.put_subscription(queue("q", start="earliest"), T0)
                await store.delete_subscription("q")

        await asyncio.gather(churn(a, 15), churn(b, 15))
        await a.put_subscription(queue("q", start="earliest"), T0)
        assert [m.sequence for m in await receive(b, "q", 10, 1000, T0)] == [1]
        assert (await b.stats("q", T0)).in_flight == 1


RECEIPT_STATEMENTS: dict[str, tuple[str, Callable[[list[int], list[str]], tuple[object, ...]]]] = {
    # name: (statement, its arguments for the receipts' ids and nonces)
    "ack": (queues.ACK, lambda ids, nonces: ("new", ids, nonces, 0)),
    "nack": (queues.NACK, lambda ids, nonces: ("new", ids, nonces, 0, T0, None)),
    "extend": (queues.EXTEND, lambda ids, nonces: ("new", ids, nonces, 0, T0)),
    "release": (queues.RELEASE, lambda ids, nonces: ("new", ids, nonces, 0, T0)),
    "settle": (
        queues.SETTLE,
        lambda ids, nonces: ("new", ids, nonces, 0, ids, nonces, [T0] * len(ids), [""] * len(ids)),
    ),
}


@pytest.mark.parametrize("analyzed", ["before the subscription filled", "after"])
async def test_receipts_are_found_by_message_id_whatever_the_statistics_say(database_url: str, analyzed: str) -> None:
    # The planner's statistics on `messages` lag behind: a subscription made and filled since the last ANALYZE looks
    # empty to it. Whatever it believes, receipts must be looked up by id: an outcome statement that found a few
    # receipts through the subscription's index walked every message it held (~60 ms a push outcome with 75,000
    # queued; bench/README.md).
    async with opened(database_url) as store:
        await store.put_subscription(queue("old"), T0)
        await store.append([ev(f"old{i}") for i in range(200)], T0)
        if analyzed != "after":
            async with store._connection() as conn:
                await conn.execute("ANALYZE messages")
        await store.put_subscription(queue("new", {"source": ["contract"]}), T0)
        await store.append([ev(f"new{i}") for i in range(3000)], T0)
        received = await receive(store, "new", 10, 1000, T0)
        if analyzed == "after":
            async with store._connection() as conn:
                await conn.execute("ANALYZE messages")
        ids, nonces = [message_id_of(m.receipt) for m in received], [nonce_of(m.receipt) for m in received]
        plans = {}
        async with store._connection() as conn:
            for n, (name, (sql, args)) in enumerate(RECEIPT_STATEMENTS.items()):
                # As the store runs it: a prepared statement (an unnamed one is planned differently).
                await conn.execute(f"PREPARE hot{n} AS {sql}")
                values = ", ".join(_literal(value) for value in args(ids, nonces))
                plans[name] = "\n".join(row[0] for row in await conn.fetch(f"EXPLAIN EXECUTE hot{n}({values})"))
                await conn.execute(f"DEALLOCATE hot{n}")
    for name, plan in plans.items():
        assert "messages_pkey" in plan, (name, plan)
        assert "messages_by_visibility" not in plan and "Seq Scan on messages" not in plan, (name, plan)


def _literal(value: object) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    assert isinstance(value, list) and value
    return f"ARRAY[{', '.join(_literal(v) for v in value)}]::{'bigint' if isinstance(value[0], int) else 'text'}[]"
