"""How many round trips to PostgreSQL the hot calls take: one at a time, the router waits out each of them.

Counted on the wire, whatever the client library does: a proxy between the store and the server counts the
server's ReadyForQuery messages, one at the end of each exchange the client waits for (a simple query, or an
extended-protocol statement up to its Sync).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

from tests.router.test_postgres_store import opened
from tests.router.test_store_contract import T0, ev, queue, receive


class WireCounter:
    """A TCP proxy in front of a PostgreSQL server, counting the exchanges that went through it."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.target = (parts.hostname or "localhost", parts.port or 5432)
        self.exchanges = 0
        self._server: asyncio.Server | None = None
        self._url = parts
        self._pipes: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        """The URL to reach the server through this proxy (without TLS, so the messages can be read)."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        netloc = self._url.netloc.rsplit("@", 1)
        host = f"127.0.0.1:{port}"
        query = "&".join(q for q in [self._url.query, "sslmode=disable"] if q)
        return urlunsplit(self._url._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host, query=query))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for pipe in self._pipes:
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _serve(self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter) -> None:
        server_in, server_out = await asyncio.open_connection(*self.target)
        pipes = [
            asyncio.ensure_future(self._copy(client_in, server_out)),
            asyncio.ensure_future(self._count(server_in, client_out)),
        ]
        self._pipes.update(pipes)
        await asyncio.gather(*pipes, return_exceptions=True)
        for writer in (client_out, server_out):
            writer.close()

    async def _copy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _count(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The server's messages are a type byte and a length; each 'Z' ends an exchange."""
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                header = await reader.readexactly(5)
                (length,) = struct.unpack("!I", header[1:])
                body = await reader.readexactly(length - 4)
                if header[:1] == b"Z":
                    self.exchanges += 1
                writer.write(header + body)
                await writer.drain()
        writer.close()


@asynccontextmanager
async def proxied(url: str) -> AsyncIterator[tuple[WireCounter, str]]:
    counter = WireCounter(url)
    try:
        yield counter, await counter.start()
    finally:
        await counter.close()


async def test_a_publish_is_three_round_trips_and_an_ack_one(database_url: str) -> None:
    async with opened(database_url, "b") as other:  # its catch-up's statements are not the publish's
        await other.put_subscription(queue("q"), T0)
        await other.catch_up()
        async with other._connection() as conn:
            assert not await other._read_pending(conn)
    async with proxied(database_url) as (wire, url), opened(url) as store:
        # The first calls on a session prepare their statements (a round trip each, once per session).
        for n in range(2):
            await store.append([ev(f"warm-{n}")], T0)
            [message] = await receive(store, "q", 1, 30_000, T0)
            await store.ack("q", [message.receipt], T0)

        before = wire.exchanges
        await store.append([ev("counted")], T0)
        # BEGIN with the transaction id; the append, its fan-out and its counters in one statement; COMMIT.
        assert wire.exchanges - before == 3

        [message] = await receive(store, "q", 1, 30_000, T0)
        before = wire.exchanges
        [result] = await store.ack("q", [message.receipt], T0)
        assert result.ok
        assert wire.exchanges - before == 1  # one statement, committed on its own
