"""The LISTEN/NOTIFY notifier: replicas hear each other's commits, throttled, re-checked, and after a cut."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

from router.notifier import Changes
from router.stores.postgres.notifier import PostgresNotifier
from tests.router.test_postgres_availability import through
from tests.tcp_proxy import TcpProxy


class Heard:
    """What a notifier's listeners heard, and an event for the next thing heard."""

    def __init__(self, notifier: PostgresNotifier) -> None:
        self.changes: list[Changes] = []
        self.next = asyncio.Event()
        notifier.listen(self._hear)

    def _hear(self, changes: Changes) -> None:
        self.changes.append(changes)
        self.next.set()

    async def until(self, check: object, timeout_s: float = 10) -> None:
        """Wait (woken by each thing heard) until `check()` is true."""
        assert callable(check)
        async with asyncio.timeout(timeout_s):
            while not check():
                self.next.clear()
                if check():
                    return
                await self.next.wait()

    def remote(self) -> list[Changes]:
        return [c for c in self.changes if not c.everything]


@asynccontextmanager
async def started(url: str, **options: float) -> AsyncIterator[PostgresNotifier]:
    notifier = PostgresNotifier(url, **options)
    await notifier.start()
    try:
        await asyncio.wait_for(notifier.connected.wait(), 10)
        yield notifier
    finally:
        await notifier.close()


async def test_a_commit_on_one_replica_is_heard_on_the_other_and_once_on_its_own(database_url: str) -> None:
    async with started(database_url) as a, started(database_url) as b:
        heard_a, heard_b = Heard(a), Heard(b)
        changes = Changes(touched=frozenset({"q"}), ready=frozenset({"q"}), hidden_until={"q": 1234}, catalog=True)
        a.publish(changes)
        await heard_b.until(lambda: heard_b.remote())
        assert heard_b.remote() == [changes]
        assert heard_a.remote() == [changes]  # at once, locally; its own NOTIFY is not heard a second time
        a.publish(Changes(touched=frozenset({"other"})))
        await heard_b.until(lambda: len(heard_b.remote()) == 2)
        assert heard_a.remote()[1:] == heard_b.remote()[1:] == [Changes(touched=frozenset({"other"}))]


async def test_a_storm_of_commits_is_merged_into_few_notifications(database_url: str) -> None:
    async with started(database_url, throttle_s=2.0) as a, started(database_url) as b:
        heard_b = Heard(b)
        for i in range(200):  # one burst, before the sender runs: one NOTIFY
            a.publish(Changes(touched=frozenset({"q"}), hidden_until={"q": 10_000 - i}))
        await heard_b.until(lambda: heard_b.remote())
        assert a.sent == 1
        assert heard_b.remote() == [Changes(touched=frozenset({"q"}), hidden_until={"q": 9_801})]
        # More for q within its throttle window wait and go as one; another subscription is not held up by q's.
        a.publish(Changes(touched=frozenset({"q"}), ready=frozenset({"q"})))
        a.publish(Changes(touched=frozenset({"q"}), hidden_until={"q": 5}))
        a.publish(Changes(touched=frozenset({"r"})))
        await heard_b.until(lambda: any("r" in c.touched for c in heard_b.remote()))
        assert not any("q" in c.touched for c in heard_b.remote()[1:])
        await heard_b.until(lambda: len(heard_b.remote()) == 3)
        assert heard_b.remote()[2] == Changes(touched=frozenset({"q"}), ready=frozenset({"q"}), hidden_until={"q": 5})
        assert a.sent == 3


async def test_every_waiter_looks_again_at_each_recheck(database_url: str) -> None:
    async with started(database_url, recheck_s=0.05) as a:
        heard = Heard(a)
        await heard.until(lambda: sum(c.everything for c in heard.changes) >= 2)
        assert a.sent == 0  # a re-check is this replica's own: nothing is sent for it


async def test_the_listening_session_comes_back_after_a_cut_and_waiters_look_again(database_url: str) -> None:
    parts = urlsplit(database_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    await proxy.start()
    try:
        async with started(database_url) as a, started(through(database_url, proxy.port)) as b:
            heard_b = Heard(b)
            await proxy.cut()  # as a restart of the server does to every session
            await heard_b.until(lambda: any(c.everything and c.catalog for c in heard_b.changes))
            assert b.connected.is_set()
            a.publish(Changes(touched=frozenset({"q"})))
            await heard_b.until(lambda: heard_b.remote())
            assert heard_b.remote() == [Changes(touched=frozenset({"q"}))]
    finally:
        await proxy.stop()
