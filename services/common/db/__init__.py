"""A service's database: SQLite files under DATA_DIR (the default) or a schema of its own on PostgreSQL.

    db = make_database(settings.service_database_url(settings.store_database_url),
                       path=settings.catalog_file, schema="store", migrations=[CATALOG, OUTBOX], name="catalog")
    await db.open()
    video = await db.transact(load_video, "v1")     # load_video(conn, "v1"): a plain function of a `Connection`
    await db.close()

The port (`Connection`, `Database`, `Migrations`) is in `port.py`; each engine is one module
(`sqlite.py`, `postgres.py`) and holds all of that engine's dialect.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote, urlsplit

from services.common.db.port import Connection, Database, Migrations, Row
from services.common.db.postgres import PostgresDatabase
from services.common.db.sqlite import SQLiteDatabase

__all__ = ["Connection", "Database", "Migrations", "PostgresDatabase", "Row", "SQLiteDatabase", "make_database"]

POSTGRES_SCHEMES = ("postgresql", "postgres")


def make_database(url: str | None, *, path: Path, schema: str, migrations: Sequence[Migrations], name: str) -> Database:
    """The database `url` names: `postgresql://...` (tables in `schema`) or `sqlite:///file`; None: SQLite at `path`.

    Raises `ValueError` naming the URL when it is neither (settings are checked at start).
    """
    if url is None:
        return SQLiteDatabase(path, migrations, name=name)
    scheme = urlsplit(url).scheme.lower()
    if scheme in POSTGRES_SCHEMES:
        return PostgresDatabase(url, schema, migrations, name=name)
    if scheme == "sqlite":
        return SQLiteDatabase(sqlite_path(url), migrations, name=name)
    raise ValueError(f"database URL scheme {scheme or url!r}: expected postgresql://... or sqlite:///path")


def sqlite_path(url: str) -> Path:
    """The file of a SQLite URL: `sqlite:///rel/file.db` is relative to the working directory,
    `sqlite:////abs/file.db` (four slashes) absolute, as SQLAlchemy reads them."""
    parts = urlsplit(url)
    if parts.netloc or len(parts.path) < 2:
        raise ValueError(f"database URL {url!r}: expected sqlite:///relative/file.db or sqlite:////absolute/file.db")
    return Path(unquote(parts.path[1:]))
