"""A throwaway PostgreSQL the test may stop and start again on the same port, to show what clients do meanwhile.

    async with stoppable_postgres() as server:
        ...                       # server.url: a fresh database on it
        await server.stop()       # fast shutdown: clients are disconnected, new connections refused
        await server.start()      # back on the same port, with everything committed before

Built on `tests.postgres.throwaway_postgres` (its own server, never the session's, which other tests use);
`pg_ctl` runs as the `postgres` user when the tests run as root, as there.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg

from tests.postgres import PostgresUnavailable, fresh_database, server_bin_dir, throwaway_postgres


@dataclass
class StoppablePostgres:
    url: str
    data: Path
    port: int
    running: bool = True

    async def stop(self) -> None:
        await _pg_ctl("stop", "--wait", "--mode", "fast", "--pgdata", str(self.data))
        self.running = False

    async def start(self) -> None:
        # The log goes beside the data directory (where the postgres user may write), not to our pipes.
        log = self.data.parent / "restarted.log"
        await _pg_ctl("start", "--wait", "--pgdata", str(self.data), "--log", str(log), "-o", f"-p {self.port}")
        self.running = True


@asynccontextmanager
async def stoppable_postgres() -> AsyncIterator[StoppablePostgres]:
    with throwaway_postgres() as server_url:
        connection = await asyncpg.connect(server_url)
        try:
            data = Path(await connection.fetchval("SHOW data_directory"))
        finally:
            await connection.close()
        async with fresh_database(server_url) as url:
            server = StoppablePostgres(url, data, urlsplit(server_url).port or 5432)
            try:
                yield server
            finally:
                if not server.running:  # running again, so the database can be dropped and the server stopped
                    await server.start()


async def _pg_ctl(*arguments: str) -> None:
    run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    command = [*run_as, str(server_bin_dir() / "pg_ctl"), *arguments]
    result = await asyncio.to_thread(subprocess.run, command, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if result.returncode != 0:
        raise PostgresUnavailable(f"{' '.join(command)} failed ({result.returncode}): {result.stdout}{result.stderr}")
