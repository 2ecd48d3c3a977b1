"""A throwaway PostgreSQL for the tests, and a fresh database for each test that needs one.

The server comes from Debian's `postgresql` package (`scripts/check` installs it when run as root):
`initdb` into a temporary directory, then `pg_ctl start -w` on a free loopback port with fsync on, its
unix socket inside that directory, as the `postgres` user when the tests run as root (initdb refuses
root). `CATTUBE_TEST_DATABASE_URL` names a running server to use instead; its URL's database is the
maintenance database the per-test databases are created from.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

from tests.process import free_port

EXTERNAL_URL_VARIABLE = "CATTUBE_TEST_DATABASE_URL"
SERVER_PACKAGE = "postgresql"
# Debian installs the server beside its version, off PATH: /usr/lib/postgresql/15/bin/pg_ctl.
DEBIAN_BIN_DIRS = Path("/usr/lib/postgresql")
SERVER_USER = "postgres"
START_TIMEOUT_S = 60


class PostgresUnavailable(RuntimeError):
    """The tests need PostgreSQL and cannot have it; the message says what to install or set."""


@dataclass(frozen=True)
class PostgresServer:
    """A server the tests may use: `url` reaches its maintenance database as a superuser."""

    url: str
    started_here: bool


def server_bin_dir() -> Path:
    """The newest directory holding both `initdb` and `pg_ctl`, from Debian's layout or else PATH."""
    candidates = sorted(DEBIAN_BIN_DIRS.glob("*/bin"), key=lambda path: _version_key(path.parent.name), reverse=True)
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).parent)
    for directory in candidates:
        if (directory / "initdb").is_file() and (directory / "pg_ctl").is_file():
            return directory
    raise PostgresUnavailable(
        f"PostgreSQL's server programs (initdb, pg_ctl) were not found under {DEBIAN_BIN_DIRS}/*/bin or on PATH. "
        f"Install Debian's `{SERVER_PACKAGE}` package (`apt-get install {SERVER_PACKAGE}`; `bash scripts/check` "
        f"does it when run as root), or set {EXTERNAL_URL_VARIABLE} to a running server's URL."
    )


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


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
    """Start a PostgreSQL of our own in a temporary directory; stop it and remove the directory afterwards."""
    bin_dir = server_bin_dir()
    as_root = os.geteuid() == 0
    run_as: list[str] = ["runuser", "-u", SERVER_USER, "--"] if as_root else []
    directory = Path(tempfile.mkdtemp(prefix="cattube-pg-"))
    try:
        if as_root:
            try:
                shutil.chown(directory, user=SERVER_USER, group=SERVER_USER)
            except LookupError:
                raise PostgresUnavailable(
                    f"Running as root, the tests start PostgreSQL as the `{SERVER_USER}` user (initdb refuses "
                    f"root), and there is no such user: install Debian's `{SERVER_PACKAGE}` package, which "
                    f"creates it, or set {EXTERNAL_URL_VARIABLE}."
                ) from None
        data, log = directory / "data", directory / "server.log"
        password = secrets.token_urlsafe(16)
        password_file = directory / "password"
        password_file.write_text(password + "\n")
        if as_root:
            shutil.chown(password_file, user=SERVER_USER, group=SERVER_USER)
        # A password, not trust: anyone else on the machine could otherwise reach it on loopback.
        # --no-sync only skips initdb's own flush of the new files (lost on a crash, which the temp dir is
        # anyway); the running server keeps fsync on, as DESIGN asks.
        _run([*run_as, str(bin_dir / "initdb"), "--pgdata", str(data), "--username", SERVER_USER,
              "--pwfile", str(password_file), "--auth", "scram-sha-256", "--encoding", "UTF8", "--locale", "C",
              "--no-sync"], "initdb")  # fmt: skip
        password_file.unlink()
        with (data / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# Written by tests/postgres.py: loopback only, socket in the temp dir, durable commits.\n"
                f"listen_addresses = '127.0.0.1'\nunix_socket_directories = '{directory}'\n"
                "fsync = on\nsynchronous_commit = on\n"
            )
        port = _start(run_as, bin_dir, data, log)
        try:
            yield f"postgresql://{SERVER_USER}:{quote(password, safe='')}@127.0.0.1:{port}/postgres"
        finally:
            # fast: roll back open transactions and disconnect whatever a failed test left connected.
            _run([*run_as, str(bin_dir / "pg_ctl"), "stop", "--wait", "--mode", "fast", "--pgdata", str(data)],
                 "pg_ctl stop", log)  # fmt: skip
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _start(run_as: list[str], bin_dir: Path, data: Path, log: Path) -> int:
    """`pg_ctl start --wait` returns once the server accepts connections; a free port can be taken before the
    server binds it, so a failed start is tried again on another."""
    attempts = 3
    for attempt in range(1, attempts + 1):
        port = free_port()
        try:
            _run([*run_as, str(bin_dir / "pg_ctl"), "start", "--wait", "--timeout", str(START_TIMEOUT_S),
                  "--pgdata", str(data), "--log", str(log), "-o", f"-p {port}"], "pg_ctl start", log)  # fmt: skip
            return port
        except PostgresUnavailable:
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


def _run(command: list[str], what: str, log: Path | None = None) -> None:
    result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        server_log = log.read_text(errors="replace")[-4000:] if log is not None and log.exists() else ""
        raise PostgresUnavailable(
            f"{what} failed (exit {result.returncode}): {' '.join(command)}\n{result.stdout}{result.stderr}{server_log}"
        )


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
