"""Service databases on both engines: `database_for` makes one on SQLite or PostgreSQL (the test runs once on each)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from services.common.db import Database, Migrations, make_database

DatabaseFactory = Callable[..., Database]
ENGINES = ["sqlite", "postgres"]


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    engine: str = request.param
    return engine


@pytest.fixture
def engine_url(engine: str, request: pytest.FixtureRequest) -> str | None:
    """This test's database URL: None for SQLite (files under tmp_path), a fresh PostgreSQL database otherwise."""
    if engine == "sqlite":
        return None
    url: str = request.getfixturevalue("database_url")
    return url


@pytest.fixture
def database_for(engine_url: str | None, tmp_path: Path) -> DatabaseFactory:
    """`database_for(schema, migrations, name=..., file=...)`: a database on this test's engine (not opened).

    Two made alike are the same tables: one file on SQLite (one process at a time), one schema on PostgreSQL.
    """

    def make(
        schema: str, migrations: Sequence[Migrations], *, name: str = "database", file: str = "db.sqlite"
    ) -> Database:
        return make_database(engine_url, path=tmp_path / file, schema=schema, migrations=migrations, name=name)

    return make
