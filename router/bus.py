"""The bus: durable publishing with group commit, subscriptions, and SQS-style queue operations.

`Bus` sits between the HTTP API and an `EventStore`. Publishers hand their events to one writer
task; whatever has queued up while the previous transaction was committing goes into the next
one, so concurrent publishers share a transaction (and its fsync) and each is answered only after
the commit that holds its events. Long polls wait on `Signals`, woken through the notifier by
commits (on any replica) and by the moment a hidden message becomes visible, never by sleeping.

The store only stores, claims and counts; the rules are here and in small engine-neutral modules
the store calls: `fanout` (which subscriptions an event goes to, and the subscription cache),
`dead_letters`, `receipts`, `replays`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence
from datetime import datetime

from router.batching import GroupCommit
from router.cloudevents import Encoded
from router.delivery import Dispatchers
from router.fanout import Fanout
from router.notifier import Changes, InProcessNotifier, Notifier
from router.persistence import (
    Appended,
    DeadLetter,
    EventStore,
    Message,
    ReceiptResult,
    Replay,
    Stats,
    Subscription,
    SubscriptionSpec,
    now_ms,
)
from router.push_policy import PushPolicy
from router.signals import Signals, wait_for, wait_turn
from router.streams import Streams
from services.common.errors import InsufficientStorage, InvalidInput, NotFound, Unavailable

log = logging.getLogger(__name__)

MAX_EVENTS_PER_COMMIT = 10_000


class Bus:
    def __init__(
        self,
        store: EventStore,
        *,
        retention_s: float,
        purge_interval_s: float = 3600,
        push_policy: PushPolicy | None = None,
        notifier: Notifier | None = None,
        max_streams: int = 100,
        max_subscriptions: int | None = None,
    ) -> None:
        self.store = store
        self.max_subscriptions = max_subscriptions
        self.retention_s = retention_s
        self.purge_interval_s = purge_interval_s
        self.notifier = notifier or InProcessNotifier()
        self.fanout = Fanout()
        self.push_policy = push_policy or PushPolicy.default()
        self.signals = Signals(store.next_visible_ms, on_timer=self._visible_again)
        self.dispatchers = Dispatchers(store, self.signals, self.push_policy, self.fanout)
        self.notifier.listen(self._on_change)
        self._writer = GroupCommit("the bus", self._append, weight=len, max_weight=MAX_EVENTS_PER_COMMIT)
        self._stopping = asyncio.Event()
        self.streams = Streams(self, max_streams)
        self._known: set[str] = set()
        """Subscriptions this replica has synced (router.delivery's dispatchers, the signals' timers)."""
        self._syncing: asyncio.Task[None] | None = None
        self._sync_again = False

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.notifier.start()
        await self.store.open(self.notifier, self.fanout)
        try:
            await self._sync_subscriptions()
        except Unavailable as exc:  # a networked store's database is away: served as 503s until it is back
            log.error("the bus starts without its subscriptions (%s); they are read once the store answers", exc)

    async def _sync_subscriptions(self) -> None:
        """Match this replica to the subscriptions, wherever they were made: a push dispatcher for each push
        subscription (shared with other replicas through leases), none for the others, and a wake-up at the
        next hidden message of each subscription seen for the first time.

        That look-up counts as hidden what is visible only after the `now` it was given, so it may answer with a
        message published while it ran (this sync runs in the background, maybe after a publish). A moment that
        has passed by the answer is left alone: the commit that made its message visible woke a waiter for it
        (a publish, a release), or a timer set for that moment from the commit that hid it did, which every
        replica hears of; a timer set now would wake every waiter at once."""
        subs = await self.list_subscriptions()
        for sub in subs:
            name = sub.spec.name
            if name not in self._known:
                self._known.add(name)
                at = await self.store.next_visible_ms(name, now_ms())
                if at is not None and at > now_ms():
                    self.signals.schedule(name, at)
            await self.dispatchers.sync(sub)
        for name in self._known - {sub.spec.name for sub in subs}:  # deleted, here or on another replica
            self._known.discard(name)
            await self.dispatchers.remove(name)
            self.signals.forget(name)

    def _on_change(self, changes: Changes) -> None:
        if changes.catalog or changes.everything:
            self.fanout.invalidate()
            self._sync_soon()
        if changes.everything:  # a re-check: every waiter and every dispatcher looks again
            self.dispatchers.mark_ready(self.dispatchers.names)
            self.signals.wake_all()
        self.dispatchers.mark_ready(changes.ready)
        self.signals.on_change(changes.touched, changes.ready, changes.hidden_until)

    def _sync_soon(self) -> None:
        """Sync the subscriptions in the background, once more if they change again meanwhile."""
        if self._stopping.is_set():
            return
        if self._syncing is not None and not self._syncing.done():
            self._sync_again = True
            return
        self._syncing = asyncio.get_running_loop().create_task(self._sync_while_changing(), name="bus-sync")

    async def _sync_while_changing(self) -> None:
        while not self._stopping.is_set():
            self._sync_again = False
            try:
                await self._sync_subscriptions()
            except Unavailable as exc:
                log.warning("subscriptions not synced (%s); the next change tries again", exc)
                return
            except Exception:
                log.exception("subscriptions not synced; the next change tries again")
                return
            if not self._sync_again:
                return

    def _visible_again(self, name: str) -> None:
        """A hidden message's time has come (a retry delay or a lease ran out): a lease may find it."""
        self.dispatchers.mark_ready((name,))

    async def run_writer(self) -> None:
        """The group-commit writer: runs until `stop()`, then commits what is still pending."""
        await self._writer.run()

    async def _append(self, batches: list[Sequence[Encoded]]) -> list[list[Appended]]:
        results = await self.store.append([event for events in batches for event in events], now_ms())
        split, offset = [], 0
        for events in batches:
            split.append(results[offset : offset + len(events)])
            offset += len(events)
        return split

    async def run_retention(self) -> None:
        """Drop events past the retention window, once an interval (a timer, not a poll)."""
        while not self._stopping.is_set():
            try:
                purged = await self.store.purge_expired(now_ms() - int(self.retention_s * 1000))
                if purged:
                    log.info("retention: purged %d events older than %ss", purged, self.retention_s)
            except Exception:
                log.exception("retention purge failed; trying again next interval")
            await wait_for(self._stopping, self.purge_interval_s)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def stopped(self) -> asyncio.Event:
        """Set by `stop()`: long polls and streams end."""
        return self._stopping

    def stop(self) -> None:
        """Stop taking work: long polls return at once, the writer commits what is pending and ends."""
        if not self._stopping.is_set():
            self._stopping.set()
            self._writer.stop()
            self.dispatchers.stop()
            self.signals.wake_all()

    async def close(self) -> None:
        if self._syncing is not None:
            self._syncing.cancel()
            await asyncio.gather(self._syncing, return_exceptions=True)
        await self.dispatchers.close()
        await self.streams.close()
        self.signals.close()
        await self.store.close()
        await self.notifier.close()

    # -- publishing -------------------------------------------------------------------------------

    async def publish(self, events: Sequence[Encoded]) -> list[Appended]:
        """Append events durably; returns after the commit that holds them."""
        try:
            return await self._writer.submit(events)
        except Unavailable:
            # The group commit answers every failed commit as unavailable; a full disk is not a moment's trouble.
            # Not "nothing was written": when the WAL's sync fails after COMMIT the rows are in the file but not
            # known to be on disk. Either way publishing again is safe (source + id are stored once).
            if (failure := self.store.write_failure) is not None:
                raise InsufficientStorage(
                    f"the bus cannot store events: {failure}; they are not stored durably: publish them again"
                    " once storage is back (an event whose source and id are stored already is not stored twice)"
                ) from None
            raise

    async def readiness(self) -> str | None:
        """Not ready while commits fail for want of storage (every publish would fail), or while the store's
        database cannot be reached."""
        if (failure := self.store.write_failure) is not None:
            return f"the bus cannot commit: {failure}"
        return await self.store.readiness()

    # -- subscriptions ----------------------------------------------------------------------------

    async def put_subscription(self, spec: SubscriptionSpec) -> tuple[Subscription, bool]:
        if not spec.is_queue:
            self.push_policy.check_url(spec.target["url"])
        sub, created = await self.store.put_subscription(spec, now_ms(), max_subscriptions=self.max_subscriptions)
        await self.dispatchers.sync(sub)
        return sub, created

    async def find_subscription(self, name: str) -> Subscription | None:
        """From the cache while it is fresh; else, and for a miss, from the store (one row).

        A stale cache (any change to the subscriptions, anywhere, makes it so: router.fanout) is read again in
        the background by the sync that every such change starts; reading all of it here too made each of a run
        of PUTs read the whole catalog once more (2,000 subscriptions: 44 PUTs/s, against 58 now). A miss is
        asked of the store: a subscription another replica just made may not be notified here yet, and answering
        404 for it would break read-your-writes for a client that moved between replicas."""
        if self.fanout.fresh and (sub := self.fanout.get(name)) is not None:
            return sub
        sub = await self.store.get_subscription(name)
        if sub is not None and self.fanout.fresh:  # the cache is behind the store: read it all again
            self.fanout.invalidate()
            self._sync_soon()
        return sub

    async def _load_subscriptions(self) -> None:
        generation = self.fanout.generation
        version, subs = await self.store.load_subscriptions()
        self.fanout.load(version, subs, generation)
        if not self.fanout.fresh:  # invalidated while we read: what we read may predate the change
            version, subs = await self.store.load_subscriptions()
            self.fanout.load(version, subs, self.fanout.generation)

    async def subscription(self, name: str) -> Subscription:
        sub = await self.find_subscription(name)
        if sub is None:
            raise NotFound(f"no subscription named {name!r}")
        return sub

    async def queue(self, name: str) -> Subscription:
        sub = await self.subscription(name)
        if not sub.spec.is_queue:
            raise NotFound(f"subscription {name!r} pushes to a URL; it has no queue to receive from")
        return sub

    async def list_subscriptions(self) -> list[Subscription]:
        if not self.fanout.fresh:
            await self._load_subscriptions()
        return self.fanout.all()

    async def delete_subscription(self, name: str) -> None:
        await self.dispatchers.remove(name)
        if not await self.store.delete_subscription(name):
            raise NotFound(f"no subscription named {name!r}")
        self.signals.forget(name)

    # -- queues -----------------------------------------------------------------------------------

    async def receive(
        self,
        name: str,
        max_messages: int,
        wait_s: float,
        visibility_timeout_s: float,
        gone: asyncio.Event | None = None,
    ) -> list[Message]:
        """Lease up to `max_messages`, waiting up to `wait_s` for the first one to be available.

        `gone` is set when the receiving client disconnects: the wait ends, and messages leased for
        it meanwhile are released at once (their attempt not counted) rather than hidden from every
        other consumer for a visibility timeout.
        """
        sub = await self.queue(name)
        gone = gone or asyncio.Event()
        deadline = asyncio.get_running_loop().time() + wait_s
        self.fanout.receiving(name, +1)  # streams' grants are passed over meanwhile: the line decides (router.fanout)
        try:
            return await self._receive(name, sub, max_messages, deadline, visibility_timeout_s, gone)
        finally:
            self.fanout.receiving(name, -1)

    async def _receive(
        self,
        name: str,
        sub: Subscription,
        max_messages: int,
        deadline: float,
        visibility_timeout_s: float,
        gone: asyncio.Event,
    ) -> list[Message]:
        while True:
            signal = self.signals[name]  # looked up again: a deleted subscription's line is forgotten
            turn = signal.join()  # in line before the read: no lost wake-ups (router.signals)
            woken = False
            try:
                messages = await self.store.receive(
                    name, max_messages, int(visibility_timeout_s * 1000), now_ms(), sub.spec.delivery.max_receive_count
                )
                if messages and gone.is_set():
                    await self.store.release(name, [m.receipt for m in messages], now_ms())
                    return []
                remaining = deadline - asyncio.get_running_loop().time()
                if messages or remaining <= 0 or self._stopping.is_set() or gone.is_set():
                    if len(messages) == max_messages:  # it may have left some behind: the next may take them
                        signal.ready(1)
                    return messages
                await wait_turn(turn, gone, remaining)
                woken = turn.done()  # then it reads again: the wake-up is used
            finally:
                if not woken:
                    signal.leave(turn)  # passes on a wake-up that came meanwhile
            sub = await self.queue(name)  # it may have been deleted or changed while we waited

    async def ack(self, name: str, receipts: Sequence[str]) -> list[ReceiptResult]:
        await self.queue(name)
        results = await self.store.ack(name, receipts, now_ms())
        self.streams.settled(results)  # acked or not held any more: the slots of streams holding them are free
        return results

    async def nack(self, name: str, receipts: Sequence[str], delay_s: float) -> list[ReceiptResult]:
        await self.queue(name)
        results = await self.store.nack(name, receipts, int(delay_s * 1000), now_ms())
        self.streams.settled(results)
        return results

    async def extend(self, name: str, receipts: Sequence[str], visibility_timeout_s: float) -> list[ReceiptResult]:
        await self.queue(name)
        results = await self.store.extend(name, receipts, int(visibility_timeout_s * 1000), now_ms())
        self.streams.extended(results, int(visibility_timeout_s * 1000))
        if visibility_timeout_s == 0:  # visible again at once, and the store names no ready change for it
            self.signals[name].ready(sum(r.ok for r in results))
        return results

    async def stats(self, name: str, wait_s: float = 0, version: int | None = None) -> tuple[Stats, int]:
        """The subscription's numbers and their version; with `version` equal to the current one,
        waits up to `wait_s` for them to change first."""
        await self.subscription(name)
        deadline = asyncio.get_running_loop().time() + wait_s
        while True:
            changed = self.signals[name].changed  # captured before the read: no lost wake-ups
            numbers = await self.store.stats(name, now_ms())
            current = stats_version(numbers)
            remaining = deadline - asyncio.get_running_loop().time()
            if version is None or version != current or remaining <= 0 or self._stopping.is_set():
                return numbers, current
            await wait_for(changed, remaining)
            await self.subscription(name)  # it may have been deleted while we waited

    async def dead_letters(self, name: str, limit: int) -> list[DeadLetter]:
        await self.subscription(name)
        return await self.store.dead_letters(name, limit)

    async def redrive(self, name: str) -> int:
        await self.subscription(name)
        return await self.store.redrive(name, now_ms())

    async def purge_dead_letters(self, name: str) -> int:
        await self.subscription(name)
        return await self.store.purge_dead_letters(name)

    # -- replays ----------------------------------------------------------------------------------

    async def replay(self, name: str, replay: str, start: int | datetime, end: int | datetime | None) -> Replay:
        """Deliver the retained events between `start` and `end` (sequences, or append times) that match
        the subscription to it again, each marked with a `replay` attribute naming this replay."""
        await self.subscription(name)
        from_seq = start if isinstance(start, int) else await self.store.sequence_at(_ms(start))
        if end is None:
            to_seq = 2**62
        elif isinstance(end, int):
            to_seq = end
        else:
            to_seq = await self.store.sequence_at(_ms(end) + 1) - 1
        if to_seq < from_seq:
            raise InvalidInput("to", f"a position at or after from (sequence {from_seq})")
        return await self.store.replay(name, replay, from_seq, to_seq, now_ms())

    async def replay_status(self, name: str, replay: str) -> Replay:
        await self.subscription(name)
        status = await self.store.replay_status(name, replay)
        if status is None:
            raise NotFound(f"subscription {name!r} has no replay named {replay!r}")
        return status


def stats_version(stats: Stats) -> int:
    """A subscription's stats version: the same on every replica for the same state, and different
    whenever its numbers or its change counter differ.

    The counter is stored and moved on in the transaction of every change (`Stats.changes`), so it
    survives restarts and is shared by replicas; the numbers are mixed in because some change without
    a commit (a hidden message becoming visible moves it from in flight to backlog). A client holding a
    version from before a restart is answered at once if anything changed meanwhile, and waits if not.
    """
    state = (
        stats.changes,
        stats.backlog,
        stats.in_flight,
        stats.delayed,
        stats.dead_lettered,
        stats.delivered_total,
        stats.failed_total,
    )
    digest = hashlib.blake2b(repr(state).encode(), digest_size=6).digest()
    return int.from_bytes(digest, "big")  # 48 bits: exact in every JSON number reader


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)
