"""The router's tests run on SQLite by default; `--router-engine=postgres` runs them on PostgreSQL.

With it, every router test that makes a data directory (in-process apps through `router_settings`, and
router processes, which inherit the environment) runs its routers on one PostgreSQL database made for
the session, emptied before each such test (TRUNCATE, a few milliseconds, where a database of its own
would cost about a second to make), named by `CATTUBE_ROUTER_DATABASE_URL`. Tests of the SQLite store
itself (marked `sqlite`) are left out. The tests of the store contract and of the PostgreSQL store run
on PostgreSQL either way, each on a database of its own (`database_url`).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator

import asyncpg
import pytest

from tests.postgres import database_url

ENGINE_OPTION = "--router-engine"
EMPTIED = (
    "TRUNCATE router.events, router.event_ids, router.subscriptions, router.counters, router.messages,"
    " router.dead_letters, router.replays RESTART IDENTITY;"
    " UPDATE router.catalog SET version = 0; ALTER SEQUENCE router.event_seq RESTART"
)


def engine(config: pytest.Config) -> str:
    value: str = config.getoption(ENGINE_OPTION)
    return value


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if engine(config) != "postgres":
        return
    kept = [item for item in items if item.get_closest_marker("sqlite") is None]
    deselected = [item for item in items if item.get_closest_marker("sqlite") is not None]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept


async def _execute(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def router_database(postgres_url: str) -> Iterator[str]:
    """The session's database for routers under test (its schema made by the first router to start)."""
    name = f"cattube_router_{secrets.token_hex(6)}"
    asyncio.run(_execute(postgres_url, f'CREATE DATABASE "{name}"'))
    yield database_url(postgres_url, name)
    asyncio.run(_execute(postgres_url, f'DROP DATABASE "{name}" WITH (FORCE)'))


async def _empty(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        if await conn.fetchval("SELECT to_regclass('router.events') IS NOT NULL"):
            await conn.execute(EMPTIED)
    finally:
        await conn.close()


@pytest.fixture(autouse=True)
def router_engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The engine the router under test runs on; on PostgreSQL, the session's database, emptied, for each test
    that makes a data directory (the routers it starts, in-process or as processes, read it from the environment)."""
    name = engine(request.config)
    if name == "postgres" and "tmp_path" in request.fixturenames:
        url: str = request.getfixturevalue("router_database")
        asyncio.run(_empty(url))
        monkeypatch.setenv("CATTUBE_ROUTER_DATABASE_URL", url)
    return name
