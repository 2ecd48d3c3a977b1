"""The PostgreSQL bus's tables, in a schema of their own (`router`), and how they come to be.

`migrate` runs at start-up under a transaction-level advisory lock, so replicas starting at once
apply each migration exactly once (the others wait, then find it applied); `schema_version` records
which migrations a database has, and a later change is a new entry at the end of `MIGRATIONS`.

The tables mirror the SQLite ones (router.stores.sqlite.schema), with what several writers need:

- `events` is partitioned by day of `appended_at` (retention drops whole partitions,
  `router.stores.postgres.retention`), and each row records the transaction that wrote it (`txid`,
  an `xid8`) and the catalog version its appender fanned it out against (`catalog_version`): the two
  facts a new subscription's catch-up needs (router.stores.postgres.subscriptions).
- `event_ids` makes `source`+`id` unique across partitions (a partitioned table's unique indexes must
  hold the partition key).
- `counters` holds each subscription's numbers as deltas in a few rows per subscription (`shard`), so
  stats are read without counting the backlog and concurrent writers rarely share a row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy

    Conn: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]
    """A connection of the store's: its own, or one lent by the pool."""

SCHEMA = "router"
LOCK_KEY = 0x6361_7474_7562_6501  # "cattube" + 1: the advisory lock that serializes migrations
SHARDS = 32
"""Rows per subscription in `counters`: a transaction adds to one picked at random."""

MIGRATIONS: list[str] = [
    # 1: the first schema.
    """
    CREATE SEQUENCE event_seq;
    CREATE TABLE events (
        seq bigint NOT NULL,
        txid xid8 NOT NULL DEFAULT pg_current_xact_id(),
        catalog_version bigint NOT NULL,
        source text NOT NULL,
        id text NOT NULL,
        type text NOT NULL,
        partitionkey text,
        appended_at bigint NOT NULL,
        body bytea NOT NULL,
        PRIMARY KEY (seq, appended_at)
    ) PARTITION BY RANGE (appended_at);
    -- The catch-up of a new subscription reads a range of transaction ids (xid8 has no BRIN operator class).
    CREATE INDEX events_by_txid ON events (txid);
    -- Times only grow along the table: a BRIN index finds a time range for a fraction of a B-tree's upkeep.
    CREATE INDEX events_by_appended_at ON events USING brin (appended_at);
    CREATE TABLE event_ids (
        source text NOT NULL,
        id text NOT NULL,
        seq bigint NOT NULL,
        appended_at bigint NOT NULL,
        PRIMARY KEY (source, id)
    );
    CREATE INDEX event_ids_by_appended_at ON event_ids USING brin (appended_at);
    CREATE TABLE catalog (
        only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
        version bigint NOT NULL
    );
    INSERT INTO catalog (version) VALUES (0);
    CREATE TABLE subscriptions (
        name text PRIMARY KEY,
        spec text NOT NULL,
        secret text NOT NULL,
        created_at bigint NOT NULL,
        start_seq bigint NOT NULL,
        created_version bigint NOT NULL,
        -- A new subscription's catch-up (router.stores.postgres.subscriptions): the snapshot it was created
        -- in, the first sequence it wants, and the transaction id below which its catch-up is complete.
        catchup_snapshot pg_snapshot,
        catchup_from bigint,
        catchup_after xid8
    );
    CREATE TABLE counters (
        sub text NOT NULL,
        shard int NOT NULL,
        messages bigint NOT NULL DEFAULT 0,
        dead bigint NOT NULL DEFAULT 0,
        delivered bigint NOT NULL DEFAULT 0,
        failed bigint NOT NULL DEFAULT 0,
        changes bigint NOT NULL DEFAULT 0,
        PRIMARY KEY (sub, shard)
    ) WITH (fillfactor = 50);
    CREATE TABLE messages (
        msg_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        sub text NOT NULL,
        seq bigint NOT NULL,
        pkey text,
        replay text,
        enqueued_at bigint NOT NULL,
        visible_at bigint NOT NULL,
        attempts int NOT NULL DEFAULT 0,
        nonce text,
        holder text,
        last_error text
    ) WITH (
        -- Rows live for seconds: inserted, leased, deleted on ack. Vacuum early and without pauses so dead
        -- rows do not pile up in the index the claims walk (the research in issue 11: claims slowed ~4x).
        fillfactor = 80,
        autovacuum_vacuum_scale_factor = 0.01,
        autovacuum_vacuum_threshold = 1000,
        autovacuum_vacuum_insert_scale_factor = 0.05,
        autovacuum_analyze_scale_factor = 0.02,
        autovacuum_vacuum_cost_delay = 0
    );
    CREATE INDEX messages_by_visibility ON messages (sub, visible_at, msg_id);
    CREATE INDEX messages_by_key ON messages (sub, pkey, seq) WHERE pkey IS NOT NULL;
    CREATE INDEX messages_by_seq ON messages (seq);
    CREATE INDEX messages_by_replay ON messages (sub, replay) WHERE replay IS NOT NULL;
    CREATE TABLE dead_letters (
        dl_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        sub text NOT NULL,
        seq bigint NOT NULL,
        replay text,
        attempts int NOT NULL,
        last_error text NOT NULL,
        context text NOT NULL DEFAULT '{}',
        dead_at bigint NOT NULL
    );
    CREATE INDEX dead_letters_by_sub ON dead_letters (sub, dl_id);
    CREATE INDEX dead_letters_by_seq ON dead_letters (seq);
    CREATE TABLE replays (
        sub text NOT NULL,
        name text NOT NULL,
        from_seq bigint NOT NULL,
        to_seq bigint NOT NULL,
        total bigint NOT NULL,
        created_at bigint NOT NULL,
        PRIMARY KEY (sub, name)
    );
    """,
]


async def migrate(conn: Conn) -> int:
    """Bring the schema up to the newest migration; returns the version it is at. Safe to run from any number
    of replicas at once: the advisory lock makes them take turns, and each applies only what is missing."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", LOCK_KEY)
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {SCHEMA}.schema_version ("
            " version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        current = await conn.fetchval(f"SELECT COALESCE(MAX(version), 0) FROM {SCHEMA}.schema_version")
        if current > len(MIGRATIONS):
            raise RuntimeError(
                f"the router's schema is at version {current}, newer than this router knows ({len(MIGRATIONS)}):"
                " run a router at least as new as the one that migrated it"
            )
        for version, ddl in enumerate(MIGRATIONS[current:], start=current + 1):
            await conn.execute(f"SET LOCAL search_path = {SCHEMA}")
            await conn.execute(ddl)
            await conn.execute(f"INSERT INTO {SCHEMA}.schema_version (version) VALUES ($1)", version)
        return len(MIGRATIONS)
