"""The fixtures every PostgreSQL test stands on: a real server, durable, loopback only, a database per test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import pytest

from services.cli import local_postgres
from tests import postgres as postgres_module
from tests.postgres import PostgresServer, PostgresUnavailable, database_url, throwaway_postgres

# Names of the databases earlier tests in this module were given, to check the next one gets another.
seen_databases: list[str] = []


@asynccontextmanager
async def connected(url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(url)
    try:
        yield connection
    finally:
        await connection.close()


async def test_a_real_server_answers(database_url: str) -> None:
    async with connected(database_url) as db:
        version = await db.fetchval("SELECT version()")
    assert version.startswith("PostgreSQL ")


async def test_commits_are_durable(database_url: str) -> None:
    async with connected(database_url) as db:
        assert await db.fetchval("SHOW fsync") == "on"
        assert await db.fetchval("SHOW synchronous_commit") == "on"


@pytest.mark.parametrize("run", [1, 2])
async def test_each_test_gets_an_empty_database_of_its_own(run: int, database_url: str, postgres_url: str) -> None:
    # Run twice: whichever runs second fails if the first one's database or table reached it.
    async with connected(database_url) as db:
        name = await db.fetchval("SELECT current_database()")
        leftover = await db.fetchval("SELECT to_regclass('public.probe')")
        await db.execute("CREATE TABLE probe (run int)")
        await db.execute("INSERT INTO probe VALUES ($1)", run)
    assert name not in seen_databases
    assert leftover is None
    async with connected(postgres_url) as server:
        still_there = await server.fetch("SELECT datname FROM pg_database WHERE datname = ANY($1)", seen_databases)
    assert still_there == [], "an earlier test's database was not dropped"
    seen_databases.append(name)


def test_database_url_keeps_credentials_and_options() -> None:
    url = database_url("postgresql://u:p%40ss@127.0.0.1:5433/postgres?sslmode=disable", "cattube_test_1")
    assert url == "postgresql://u:p%40ss@127.0.0.1:5433/cattube_test_1?sslmode=disable"


async def test_the_server_listens_on_loopback_only(postgres: PostgresServer) -> None:
    # CATTUBE_TEST_DATABASE_URL's server is the user's business; the one the fixtures start is checked.
    if postgres.started_here:
        await _assert_loopback_only(postgres.url)
    else:
        with throwaway_postgres() as url:
            await _assert_loopback_only(url)


async def _assert_loopback_only(url: str) -> None:
    async with connected(url) as server:
        assert await server.fetchval("SHOW listen_addresses") == "127.0.0.1"
        socket_dirs = await server.fetchval("SHOW unix_socket_directories")
        data_dir = await server.fetchval("SHOW data_directory")
    # The socket lives in the server's temp dir, not the system's /var/run/postgresql.
    assert data_dir.startswith(socket_dirs + "/")


def test_missing_server_programs_name_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(local_postgres, "DEBIAN_BIN_DIRS", tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(PostgresUnavailable, match=r"install Debian's `postgresql` package.*CATTUBE_TEST_DATABASE_URL"):
        postgres_module.server_bin_dir()
