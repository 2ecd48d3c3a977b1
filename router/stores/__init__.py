"""Storage adapters behind `router.persistence.EventStore`, chosen by a database URL.

`CATTUBE_ROUTER_DATABASE_URL`, else `CATTUBE_DATABASE_URL`, else the SQLite file under `DATA_DIR`
(`sqlite:///DATA_DIR/router/bus.db`, where the router has always kept it). `postgresql://` (or
`postgres://`) names the networked store, which any number of replicas share; each store comes with
the notifier its waiters hear commits through (router.notifier).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlsplit

from router.notifier import InProcessNotifier, Notifier
from router.persistence import EventStore
from router.settings import RouterSettings
from router.stores.postgres import Connection, PostgresEventStore
from router.stores.postgres.notifier import PostgresNotifier
from router.stores.sqlite import SQLiteEventStore

__all__ = ["StoreConfigError", "database_url", "store_factory", "sqlite_path"]


class StoreConfigError(ValueError):
    """The database URL names no store this router can use."""


def database_url(settings: RouterSettings) -> str:
    """The router's database: its own URL, else the shared one, else SQLite under DATA_DIR."""
    return settings.router_database_url or settings.database_url or f"sqlite:///{settings.bus_file}"


def sqlite_path(url: str) -> Path:
    """The file of a SQLite URL, as SQLAlchemy reads them: `sqlite:///rel/bus.db` is relative to the
    working directory, `sqlite:////abs/bus.db` (four slashes) absolute."""
    parts = urlsplit(url)
    if parts.netloc or len(parts.path) < 2:
        raise StoreConfigError(
            f"database URL {url!r}: expected sqlite:///relative/file.db or sqlite:////absolute/file.db"
        )
    return Path(unquote(parts.path[1:]))


def store_factory(settings: RouterSettings) -> Callable[[], tuple[EventStore, Notifier]]:
    """What makes the store the settings name, and its notifier; raises `StoreConfigError` at once (at start) when
    the URL names no usable store. Both are made, and opened, by the app's lifespan."""
    url = database_url(settings)
    scheme = urlsplit(url).scheme.lower()
    if scheme == "sqlite":
        path = sqlite_path(url)
        return lambda: (
            SQLiteEventStore(path, durability=settings.durability, wal_limit_bytes=settings.wal_limit_bytes),
            InProcessNotifier(),
        )
    if scheme in ("postgresql", "postgres"):
        connection = Connection(
            url,
            pool_size=settings.database_pool_size,
            statement_timeout_s=settings.database_statement_timeout_s,
            idle_in_transaction_timeout_s=settings.database_idle_in_transaction_timeout_s,
            durability=settings.durability,
        )
        return lambda: (
            PostgresEventStore(connection),
            PostgresNotifier(connection, recheck_s=settings.database_recheck_s),
        )
    raise StoreConfigError(
        f"database URL scheme {scheme or url!r} is not supported;"
        " expected sqlite:///path or postgresql://user:password@host:port/database"
    )
