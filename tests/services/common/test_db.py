"""The database port's contract, on SQLite and PostgreSQL: migrations, counters, transactions, and replicas at once."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from services.common import outbox
from services.common.db import Connection, Migrations, PostgresDatabase, SQLiteDatabase
from services.common.errors import Unavailable
from services.store import tables
from services.store.records import Video
from tests.services.conftest import DatabaseFactory

NOTES_V1 = Migrations(
    "notes",
    sqlite=("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL);",),
    postgres=("CREATE TABLE notes (id BIGINT PRIMARY KEY, body TEXT NOT NULL); CREATE SEQUENCE ids;",),
)


def sign_old_notes(conn: Connection) -> None:
    """A step SQL alone would not say as clearly: a function of the connection, in the migration's transaction."""
    conn.execute("UPDATE notes SET author = ? WHERE author = 'someone'", "the cat")


# The same part a release later: steps appended (a step that ran twice would fail: the column exists).
ADD_AUTHOR = "ALTER TABLE notes ADD COLUMN author TEXT NOT NULL DEFAULT 'someone';"
NOTES_V2 = Migrations(
    "notes",
    sqlite=(*NOTES_V1.sqlite, ADD_AUTHOR, sign_old_notes),
    postgres=(*NOTES_V1.postgres, ADD_AUTHOR, sign_old_notes),
)


def version_of(conn: Connection, name: str) -> int:
    return int(conn.fetchval("SELECT version FROM schema_versions WHERE name = ?", name))


async def test_migrations_run_forward_once_and_a_new_step_at_the_next_start(database_for: DatabaseFactory) -> None:
    db = database_for("notes", [NOTES_V1])
    await db.open()
    await db.transact(lambda conn: conn.execute("INSERT INTO notes (id, body) VALUES (?, ?)", 1, "purr"))
    await db.close()
    for _ in range(2):  # the upgrade, then a plain restart: step 2 runs once
        db = database_for("notes", [NOTES_V2])
        await db.open()
        try:
            row = await db.transact(lambda conn: conn.fetchrow("SELECT body, author FROM notes WHERE id = ?", 1))
            assert row is not None and (row["body"], row["author"]) == ("purr", "the cat")
            assert await db.transact(version_of, "notes") == 3
        finally:
            await db.close()


async def test_tables_newer_than_this_code_are_refused_naming_the_versions(database_for: DatabaseFactory) -> None:
    db = database_for("notes", [NOTES_V2])
    await db.open()
    await db.close()
    older = database_for("notes", [NOTES_V1])
    try:
        with pytest.raises(Unavailable, match=r"notes tables at version 3, newer than this CatTube knows \(1\)"):
            await older.open()  # SQLite refuses at start; PostgreSQL starts and refuses every transaction
            await older.transact(lambda conn: conn.fetchval("SELECT 1"))
    finally:
        await older.close()


async def test_a_transaction_that_raises_leaves_nothing(database_for: DatabaseFactory) -> None:
    db = database_for("notes", [NOTES_V1])
    await db.open()
    try:

        def half_done(conn: Connection) -> None:
            conn.execute("INSERT INTO notes (id, body) VALUES (?, ?)", 1, "kept?")
            raise RuntimeError("changed my mind")

        with pytest.raises(RuntimeError, match="changed my mind"):
            await db.transact(half_done)
        assert await db.transact(lambda conn: conn.fetchval("SELECT COUNT(*) FROM notes")) == 0
    finally:
        await db.close()


async def test_question_marks_inside_quotes_are_text_not_placeholders(database_for: DatabaseFactory) -> None:
    db = database_for("notes", [NOTES_V1])
    await db.open()
    try:
        changed = await db.transact(
            lambda conn: conn.execute("INSERT INTO notes (id, body) VALUES (?, 'why?' || ? || '''?''')", 7, "!")
        )
        assert changed == 1
        assert await db.transact(lambda conn: conn.fetchval("SELECT body FROM notes WHERE id = ?", 7)) == "why?!'?'"
    finally:
        await db.close()


async def test_counters_only_grow_and_never_repeat_across_writers(database_for: DatabaseFactory, engine: str) -> None:
    # Two handles on one database: two replicas on PostgreSQL; on SQLite (one process per file) one handle.
    replicas = [database_for("notes", [NOTES_V1]) for _ in range(2 if engine == "postgres" else 1)]
    for db in replicas:
        await db.open()
    try:
        drawn = await asyncio.gather(
            *(replicas[n % len(replicas)].transact(lambda conn: conn.next_value("ids")) for n in range(40))
        )
        assert len(set(drawn)) == 40 and min(drawn) >= 1
        later = await replicas[0].transact(lambda conn: conn.next_value("ids"))
        assert later > max(drawn)
    finally:
        for db in replicas:
            await db.close()


async def test_a_catalog_file_from_before_versions_keeps_its_data_and_its_versions_go_on(tmp_path: Path) -> None:
    """A SQLite catalog made before schema versioning (no versions table, no outbox owner) is adopted as it is."""
    path = tmp_path / "catalog.db"
    with sqlite3.connect(path) as old:
        old.executescript(tables.SQLITE_TABLES + outbox.OUTBOX.sqlite[0])
        old.execute(
            "INSERT INTO videos (video_id, status, created_at, updated_at, version) VALUES ('v1', 'ready', 1, 1, 7)"
        )
        old.execute('INSERT INTO outbox (event, created_at) VALUES (\'{"id": "e1"}\', 1)')
    old.close()
    db = SQLiteDatabase(path, [tables.CATALOG, outbox.OUTBOX])
    await db.open()
    try:

        def touch(conn: Connection) -> Video:
            video = tables.load_video(conn, "v1")
            assert video is not None
            tables.write_video(conn, video, 2.0)
            return video

        assert (await db.transact(touch)).version == 8  # never below what clients already saw
        assert await db.transact(outbox.counts, "") == (1, 0)  # the owed event is still owed
        assert await db.transact(version_of, "catalog") == len(tables.CATALOG.sqlite)
    finally:
        await db.close()


# -- PostgreSQL: replicas ------------------------------------------------------------------------------


async def test_replicas_starting_at_once_make_the_schema_once(database_url: str) -> None:
    replicas = [PostgresDatabase(database_url, "store", [tables.CATALOG, outbox.OUTBOX]) for _ in range(4)]
    try:
        await asyncio.gather(*(db.open() for db in replicas))  # without the advisory lock: "already exists"
        versions = await asyncio.gather(*(db.transact(version_of, "catalog") for db in replicas))
        assert versions == [len(tables.CATALOG.postgres)] * 4
    finally:
        await asyncio.gather(*(db.close() for db in replicas))


async def test_two_replicas_changing_one_row_at_once_lose_no_change(database_url: str) -> None:
    """Both read the row, then both write it: REPEATABLE READ fails one, which runs again on the other's result."""
    a, b = (PostgresDatabase(database_url, "notes", [NOTES_V1]) for _ in range(2))
    await a.open()
    await b.open()
    both_read = threading.Barrier(2, timeout=10)  # the functions run on worker threads
    first_tries = {"a": True, "b": True}

    def add_one(conn: Connection, who: str) -> None:
        count = int(conn.fetchval("SELECT body FROM notes WHERE id = 1"))
        if first_tries[who]:
            first_tries[who] = False
            both_read.wait()
        conn.execute("UPDATE notes SET body = ? WHERE id = 1", str(count + 1))

    try:
        await a.transact(lambda conn: conn.execute("INSERT INTO notes (id, body) VALUES (1, '0')"))
        await asyncio.gather(a.transact(add_one, "a"), b.transact(add_one, "b"))
        assert await a.transact(lambda conn: conn.fetchval("SELECT body FROM notes WHERE id = 1")) == "2"
    finally:
        await a.close()
        await b.close()


async def test_replicas_writing_different_videos_at_once_give_them_different_versions(database_url: str) -> None:
    """Versions come from a sequence: two writers at once never draw the same one (MAX()+1 would, for both)."""
    a, b = (PostgresDatabase(database_url, "store", [tables.CATALOG, outbox.OUTBOX]) for _ in range(2))
    await a.open()
    await b.open()
    both_started = threading.Barrier(2, timeout=10)

    def write(conn: Connection, video_id: str) -> int:
        conn.fetchval("SELECT COUNT(*) FROM videos")  # both transactions see the catalog as it was
        both_started.wait()
        video = Video(video_id, created_at=1.0)
        tables.write_video(conn, video, 1.0)
        return video.version

    try:
        versions = await asyncio.gather(a.transact(write, "v1"), b.transact(write, "v2"))
        assert len(set(versions)) == 2
    finally:
        await a.close()
        await b.close()
