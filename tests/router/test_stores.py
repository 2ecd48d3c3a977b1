"""The store is chosen by a database URL; SQLite under DATA_DIR stays the default."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from router.app import create_app
from router.settings import RouterSettings
from router.stores import StoreConfigError, database_url, sqlite_path, store_factory
from router.stores.postgres import PostgresEventStore
from router.stores.postgres.notifier import PostgresNotifier
from tests.conftest import running
from tests.process import REPO
from tests.router.events import STRUCTURED, event


@pytest.mark.sqlite  # the environment names PostgreSQL under --router-engine=postgres
def test_the_default_is_the_sqlite_file_existing_data_dirs_have(tmp_path: Path) -> None:
    url = database_url(RouterSettings(data_dir=tmp_path))
    assert sqlite_path(url) == tmp_path / "router" / "bus.db"


@pytest.mark.sqlite  # the environment names PostgreSQL under --router-engine=postgres
def test_the_router_url_wins_over_the_shared_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CATTUBE_DATABASE_URL", "sqlite:///shared.db")
    assert database_url(RouterSettings(data_dir=tmp_path)) == "sqlite:///shared.db"
    monkeypatch.setenv("CATTUBE_ROUTER_DATABASE_URL", f"sqlite:///{tmp_path}/own.db")
    assert sqlite_path(database_url(RouterSettings(data_dir=tmp_path))) == tmp_path / "own.db"


def test_sqlite_urls_read_as_sqlalchemy_reads_them() -> None:
    assert sqlite_path("sqlite:///rel/bus.db") == Path("rel/bus.db")
    assert sqlite_path("sqlite:////abs/bus.db") == Path("/abs/bus.db")
    with pytest.raises(StoreConfigError, match="sqlite:///"):
        sqlite_path("sqlite://host/bus.db")


@pytest.mark.sqlite  # the environment names PostgreSQL under --router-engine=postgres
async def test_a_database_url_puts_the_bus_where_it_says(tmp_path: Path) -> None:
    app = create_app(RouterSettings(data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path}/elsewhere.db"))
    async with running(app) as client:
        response = await client.post("/events", json=event(), headers=STRUCTURED)
        assert response.status_code == 202
    assert (tmp_path / "elsewhere.db").exists()
    assert not (tmp_path / "data" / "router" / "bus.db").exists()


@pytest.mark.parametrize("url", ["postgresql://u:p@127.0.0.1:5432/cattube", "postgres://127.0.0.1/db"])
def test_a_postgresql_url_names_the_networked_store_and_its_notifier(tmp_path: Path, url: str) -> None:
    store, notifier = store_factory(RouterSettings(data_dir=tmp_path, router_database_url=url))()
    assert isinstance(store, PostgresEventStore) and isinstance(notifier, PostgresNotifier)
    assert store.connection.where() == f"127.0.0.1:{urlsplit(url).port or 5432}{urlsplit(url).path}"


def test_an_unknown_scheme_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreConfigError, match="mysql"):
        create_app(RouterSettings(data_dir=tmp_path, router_database_url="mysql://x/y"))


async def test_the_process_exits_with_the_sentence_not_a_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "CATTUBE_DATA_DIR": str(tmp_path), "CATTUBE_ROUTER_DATABASE_URL": "mysql://127.0.0.1/db"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "router", cwd=REPO, env=env, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await proc.communicate()
    assert proc.returncode == 1
    assert "not supported" in stderr.decode() and "Traceback" not in stderr.decode()
