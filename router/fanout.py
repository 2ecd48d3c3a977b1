"""Fan-out: which subscriptions a new event is queued for, and which of those go straight to a dispatcher.

The rule is the bus's, not a store's: an event is queued for every subscription whose pattern
matches it (router.patterns), once per subscription, in the transaction that appends it. Inside
that transaction a store reads its catalog version (a counter it moves on with every create, change
and delete), asks `at` for the subscriptions of that version (read again through `load` when it
moved), and calls `targets` for each new event: a subscription committed by any replica is matched
from the next append on, and none that was deleted.

The same object is the bus's read cache of subscriptions (`get`, `all`): it is invalidated by the
notifier whenever the catalog changes anywhere, and loaded again from the store on the next read.

Hand-off: an idle push dispatcher offers slots (`offer`); an append that queues a message for its
subscription leases it in the same transaction instead (the store asks `targets`, which answers with
the lease length), and after the commit the messages go to the dispatcher through `on_handoff`,
sparing a lease transaction and a wake-up on the way out. Grants are taken on the store's thread and
offered from the event loop, hence the lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from router.persistence import Message, Subscription

Handoffs = dict[str, list[Message]]


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
        self._grants: dict[str, list[int]] = {}
        self.on_handoff: Callable[[Handoffs], None] = lambda handoffs: None

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

    def targets(self, catalog: Catalog, event: dict[str, Any]) -> Iterator[tuple[Subscription, int | None]]:
        """The subscriptions of `catalog` that `event` is queued for, each with the lease length (ms) of a
        dispatcher slot it takes, or None to queue it the ordinary way."""
        for sub in catalog.subs.values():
            if sub.spec.matches(event):
                yield sub, (None if sub.spec.is_queue else self._take_grant(sub.spec.name))

    # -- hand-off to idle push dispatchers ------------------------------------------------------------------

    def offer(self, name: str, slots: int, lease_ms: int) -> None:
        """An idle dispatcher with `slots` free: lease new matching events to it as they are appended."""
        with self._grant_lock:
            self._grants[name] = [slots, lease_ms]

    def withdraw(self, name: str) -> int:
        """Take the offer back; returns the slots it had left (the rest were handed off)."""
        with self._grant_lock:
            grant = self._grants.pop(name, None)
        return grant[0] if grant else 0

    def _take_grant(self, name: str) -> int | None:
        with self._grant_lock:
            grant = self._grants.get(name)
            if grant is None or grant[0] <= 0:
                return None
            grant[0] -= 1
            return grant[1]

    def rolled_back(self, handoffs: Handoffs) -> None:
        """The transaction that leased `handoffs` did not commit: their slots are free again."""
        with self._grant_lock:
            for name, messages in handoffs.items():
                if name in self._grants:
                    self._grants[name][0] += len(messages)

    def hand_off(self, handoffs: Handoffs) -> None:
        """After the commit: the leased messages go to their dispatchers."""
        if handoffs:
            self.on_handoff(handoffs)
