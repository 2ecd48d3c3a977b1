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
from tests.tcp_proxy import TcpProxy


class WireCounter(TcpProxy):
    """A TCP proxy in front of a PostgreSQL server, counting the exchanges that went through it."""

    def __init__(self, url: str) -> None:
        self._url = urlsplit(url)
        super().__init__(self._url.hostname or "localhost", self._url.port or 5432)
        self.exchanges = 0

    def url(self) -> str:
        """The URL to reach the server through this proxy (without TLS, so the messages can be read)."""
        credentials, _, _ = self._url.netloc.rpartition("@")
        host = f"127.0.0.1:{self.port}"
        query = "&".join(q for q in [self._url.query, "sslmode=disable"] if q)
        return urlunsplit(self._url._replace(netloc=f"{credentials}@{host}" if credentials else host, query=query))

    async def _from_server(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The server's messages are a type byte and a length; each 'Z' ends an exchange."""
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while True:
                header = await reader.readexactly(5)
                (length,) = struct.unpack("!I", header[1:])
                body = await reader.readexactly(length - 4)
                if header[:1] == b"Z":
                    self.exchanges += 1
                writer.write(header + body)
                await writer.drain()
        writer.transport.abort()


@asynccontextmanager
async def proxied(url: str) -> AsyncIterator[tuple[WireCounter, str]]:
    counter = WireCounter(url)
    await counter.start()
    try:
        yield counter, counter.url()
    finally:
        await counter.stop()


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
