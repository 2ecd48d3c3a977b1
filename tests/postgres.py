"""A throwaway PostgreSQL for the tests, and a fresh database for each test that needs one.

The server comes from Debian's `postgresql` package (`scripts/check` installs it when run as root),
started the way `cattube up --cluster` starts its own (services.cli.local_postgres): `initdb` into a
temporary directory, then `pg_ctl start -w` on a free loopback port with fsync on, as the `postgres`
user when the tests run as root. `CATTUBE_TEST_DATABASE_URL` names a running server to use instead;
its URL's database is the maintenance database the per-test databases are created from.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

from services.cli import local_postgres
from tests.process import free_port

EXTERNAL_URL_VARIABLE = "CATTUBE_TEST_DATABASE_URL"


class PostgresUnavailable(RuntimeError):
    """The tests need PostgreSQL and cannot have it; the message says what to install or set."""


@dataclass(frozen=True)
class PostgresServer:
    """A server the tests may use: `url` reaches its maintenance database as a superuser."""

    url: str
    started_here: bool


def server_bin_dir() -> Path:
    try:
        return local_postgres.server_bin_dir()
    except local_postgres.PostgresUnavailable as error:
        raise PostgresUnavailable(
            f"{error} (`bash scripts/check` does it when run as root), or set {EXTERNAL_URL_VARIABLE} to a "
            "running server's URL"
        ) from None


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """The server named by CATTUBE_TEST_DATABASE_URL as is, or else a throwaway one for as long as the block runs."""
    external = os.environ.get(EXTERNAL_URL_VARIABLE)
    if external:
        yield PostgresServer(url=external, started_here=False)
        return
    with throwaway_postgres() as url:
        yield PostgresServer(url=url, started_here=True)


@contextmanager
def throwaway_postgres() -> Iterator[str]:
    """Start a PostgreSQL of our own in a temporary directory (services.cli.local_postgres); stop it and
    remove the directory afterwards."""
    server_bin_dir()  # the clearest message first, naming the test variable too
    directory = Path(tempfile.mkdtemp(prefix="cattube-pg-"))
    try:
        password = secrets.token_urlsafe(16)
        try:
            data = local_postgres.initdb(directory, password)
            log = directory / "server.log"
            port = _start(data, log)
        except local_postgres.PostgresUnavailable as error:
            raise PostgresUnavailable(f"{error}; or set {EXTERNAL_URL_VARIABLE}") from None
        try:
            yield local_postgres.url(password, port)
        finally:
            # fast: roll back open transactions and disconnect whatever a failed test left connected.
            local_postgres.stop(data, log)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _start(data: Path, log: Path) -> int:
    """A free port can be taken before the server binds it, so a failed start is tried again on another."""
    attempts = 3
    for attempt in range(1, attempts + 1):
        port = free_port()
        try:
            local_postgres.start(data, port, log)
            return port
        except local_postgres.PostgresUnavailable:
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


def database_url(server_url: str, name: str) -> str:
    """The server's URL with its database replaced by `name` (user, password, host and options kept)."""
    parts = urlsplit(server_url)
    return urlunsplit(parts._replace(path="/" + quote(name, safe="")))


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(":" + parts.password + "@", ":***@", 1)))


@asynccontextmanager
async def fresh_database(server_url: str) -> AsyncIterator[str]:
    """Create a database with a unique name on the server, hand back its URL, and drop it afterwards."""
    name = f"cattube_test_{secrets.token_hex(8)}"
    try:
        connection = await asyncpg.connect(server_url)
    except (OSError, asyncpg.PostgresError) as error:
        raise PostgresUnavailable(
            f"Cannot connect to PostgreSQL at {_without_password(server_url)}: {error!r}. "
            f"If {EXTERNAL_URL_VARIABLE} names it, is that server running?"
        ) from error
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    try:
        yield database_url(server_url, name)
    finally:
        connection = await asyncpg.connect(server_url)
        try:
            # FORCE (PostgreSQL 13+): connections a test left open (a killed router's pool) must not keep it.
            await connection.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        finally:
            await connection.close()
