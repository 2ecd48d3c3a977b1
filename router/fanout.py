"""Fan-out: which subscriptions a new event is queued for, and which of those go straight to a dispatcher.

The rule is the bus's, not a store's: an event is queued for every subscription whose pattern
matches it (router.patterns), once per subscription, in the transaction that appends it. Inside
that transaction a store reads its catalog version (a counter it moves on with every create, change
and delete), asks `at` for the subscriptions of that version (read again through `load` when it
moved), and calls `targets` for each new event: a subscription committed by any replica is matched
from the next append on, and none that was deleted.

The same object is the bus's read cache of subscriptions (`get`, `all`): it is invalidated by the
notifier whenever the catalog changes anywhere, and loaded again from the store on the next read.

Hand-off: a taker with free slots and nothing to read (an idle push dispatcher, a stream of a queue waiting
in its subscription's line) offers them as a `Grant`; an append that queues a message for its subscription
leases it in the same transaction instead (the store asks `targets`, which answers with the grant and so the
lease length), and after the commit the messages go to the grant's `take`, sparing a lease transaction and a
wake-up on the way out. Several grants of one subscription (streams) take turns, one message each. While a
long-poll receive of this replica waits on a subscription, its grants are passed over: the message is queued
the ordinary way and the line of receivers (router.signals) decides who gets it, as before hand-offs (a
receive asks for messages now, and must not starve behind streams that keep windows open). Ordered
subscriptions are never handed off (only the store's lease knows which keys are held back). Grants are
taken on the store's thread and offered from the event loop, hence the lock.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from router.persistence import Message, Subscription


class Grant:
    """Slots one taker offers for hand-off: `slots` free now, `pending` taken by transactions not yet handed off
    or rolled back. The taker counts both as used (its window holds at most what it offered)."""

    __slots__ = ("lease_ms", "name", "pending", "slots", "take")

    def __init__(self, name: str, take: Callable[[list[Message]], None], lease_ms: int = 0) -> None:
        self.name = name
        self.take = take
        """Called on the event loop after the commit, with the messages leased for this grant."""
        self.lease_ms = lease_ms
        self.slots = 0
        self.pending = 0

    def __repr__(self) -> str:
        return f"Grant({self.name!r}, slots={self.slots}, pending={self.pending}, lease_ms={self.lease_ms})"


Handoffs = dict[Grant, list[Message]]
"""What one transaction leased for hand-off: per grant, its messages (in order)."""


@dataclass(frozen=True, slots=True)
class Catalog:
    """The subscriptions as committed at one catalog version (None: not read yet)."""

    version: int | None = None
    subs: dict[str, Subscription] = field(default_factory=dict)


class Fanout:
    def __init__(self) -> None:
        self._catalog = Catalog()
        self._fresh = False
        self._generation = 0
        self._grant_lock = threading.Lock()
        self._grants: dict[str, deque[Grant]] = {}
        self._receiving: dict[str, int] = {}

    # -- the subscriptions ---------------------------------------------------------------------------

    @property
    def version(self) -> int | None:
        return self._catalog.version

    @property
    def catalog(self) -> Catalog:
        """The newest catalog read (one reference: its version and subscriptions always belong together)."""
        return self._catalog

    def at(self, version: int, load: Callable[[], Iterable[Subscription]]) -> Catalog:
        """Inside a store transaction that read the catalog at `version`: its subscriptions, read again
        through `load` if the version moved. A newer read replaces the cached one (never an older one,
        which a concurrent transaction of a networked store may still see); it does not make the cache
        fresh for the bus's reads, which only `load` after an invalidation does."""
        catalog = self._catalog
        if catalog.version != version:
            catalog = Catalog(version, {sub.spec.name: sub for sub in load()})
            if self._catalog.version is None or version > self._catalog.version:
                self._catalog = catalog  # one reference swap: readers see the old or the new
        return catalog

    def load(self, version: int, subs: Iterable[Subscription], generation: int) -> None:
        """The bus read the subscriptions when the cache was at `generation`: keep them, and trust them
        for reads, unless the notifier invalidated the cache meanwhile."""
        if generation == self._generation:
            self._catalog = Catalog(version, {sub.spec.name: sub for sub in subs})
            self._fresh = True

    def invalidate(self) -> None:
        """The catalog changed somewhere: the next read goes to the store."""
        self._generation += 1
        self._fresh = False

    @property
    def fresh(self) -> bool:
        return self._fresh

    @property
    def generation(self) -> int:
        return self._generation

    def get(self, name: str) -> Subscription | None:
        return self._catalog.subs.get(name)

    def all(self) -> list[Subscription]:
        return sorted(self._catalog.subs.values(), key=lambda s: s.spec.name)

    # -- routing ---------------------------------------------------------------------------------------

    def targets(self, catalog: Catalog, event: dict[str, Any]) -> Iterator[tuple[Subscription, Grant | None]]:
        """The subscriptions of `catalog` that `event` is queued for, each with the grant whose slot it takes (its
        lease length is the grant's), or None to queue it the ordinary way."""
        grants = self._grants
        for sub in catalog.subs.values():
            if sub.spec.matches(event):
                name = sub.spec.name
                yield sub, (self._take_grant(name) if name in grants and not sub.spec.delivery.ordered else None)

    # -- hand-off to idle push dispatchers and waiting streams -------------------------------------------

    def offer(self, grant: Grant, slots: int, lease_ms: int) -> None:
        """A taker with `slots` free (and nothing to read): lease new matching events to it as they are appended,
        each for `lease_ms`. Replaces what the grant offered before."""
        with self._grant_lock:
            grant.slots, grant.lease_ms = slots, lease_ms
            line = self._grants.setdefault(grant.name, deque())
            if grant not in line:
                line.append(grant)

    def withdraw(self, grant: Grant) -> int:
        """Take the offer back; returns the slots it had left (the rest were taken: see `Grant.pending`)."""
        with self._grant_lock:
            slots, grant.slots = grant.slots, 0
            line = self._grants.get(grant.name)
            if line is not None and grant in line:
                line.remove(grant)
                if not line:
                    del self._grants[grant.name]
        return slots

    def grow(self, grant: Grant, slots: int) -> bool:
        """Add `slots` to a grant still offered (True), or do nothing (False: its taker looks again itself)."""
        with self._grant_lock:
            line = self._grants.get(grant.name)
            if line is None or grant not in line:
                return False
            grant.slots += slots
            return True

    def offered(self, name: str) -> int:
        """Slots offered for `name` now (for tests and stats)."""
        with self._grant_lock:
            return sum(grant.slots for grant in self._grants.get(name, ()))

    def receiving(self, name: str, delta: int) -> None:
        """A long-poll receive of this replica starts (+1) or stops (-1) waiting on `name`: grants are passed over
        meanwhile (see the module's docstring). Called on the loop; read on the store's thread (one int)."""
        count = self._receiving.get(name, 0) + delta
        if count > 0:
            self._receiving[name] = count
        else:
            self._receiving.pop(name, None)

    def _take_grant(self, name: str) -> Grant | None:
        if self._receiving.get(name):
            return None
        with self._grant_lock:
            line = self._grants.get(name)
            if not line:
                return None
            for _ in range(len(line)):
                grant = line[0]
                line.rotate(-1)  # the next message goes to the next grant: the takers share
                if grant.slots > 0:
                    grant.slots -= 1
                    grant.pending += 1
                    return grant
            return None

    def rolled_back(self, handoffs: Handoffs) -> None:
        """The transaction that leased `handoffs` did not commit (or is not known durable): their slots are free
        again, offered again if their grant still is."""
        with self._grant_lock:
            for grant, messages in handoffs.items():
                grant.pending -= len(messages)
                line = self._grants.get(grant.name)
                if line is not None and grant in line:
                    grant.slots += len(messages)

    def hand_off(self, handoffs: Handoffs) -> None:
        """After the commit (on the event loop): the leased messages go to their takers."""
        if not handoffs:
            return
        with self._grant_lock:
            for grant, messages in handoffs.items():
                grant.pending -= len(messages)
        for grant, messages in handoffs.items():
            grant.take(messages)
