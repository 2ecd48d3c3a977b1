"""A throwaway PostgreSQL the test may stop and start again on the same port, to show what clients do meanwhile.

    async with stoppable_postgres() as server:
        ...                       # server.url: a fresh database on it
        await server.stop()       # fast shutdown: clients are disconnected, new connections refused
        await server.start()      # back on the same port, with everything committed before

Built on `tests.postgres.throwaway_postgres` (its own server, never the session's, which other tests use);
`pg_ctl` runs as `cattube up --cluster` runs it (services.cli.local_postgres).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg

from services.cli import local_postgres
from tests.postgres import fresh_database, throwaway_postgres


@dataclass
class StoppablePostgres:
    url: str
    data: Path
    port: int
    running: bool = True

    async def stop(self) -> None:
        await asyncio.to_thread(local_postgres.stop, self.data)
        self.running = False

    async def start(self) -> None:
        # The log goes beside the data directory (where the postgres user may write), not to our pipes.
        await asyncio.to_thread(local_postgres.start, self.data, self.port, self.data.parent / "restarted.log")
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
