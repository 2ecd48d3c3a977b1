"""The notifier port: how a commit tells every waiter, on this replica or another, that something changed.

Stores publish a `Changes` after each commit that changes a subscription's queue or the set of
subscriptions; long polls (receive, stats), push dispatchers and the subscription cache listen. Only
wake-ups travel this way, never data: a listener reads the store again, so a lost or late
notification delays an answer but never makes one wrong.

`InProcessNotifier` serves a single process (SQLite): listeners hear of a commit on the event loop
right after it. A networked store brings its own (PostgreSQL: LISTEN/NOTIFY, with a periodic
re-check since NOTIFY is best-effort).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Changes:
    """What one commit did."""

    touched: frozenset[str] = frozenset()
    """Subscriptions whose queue or numbers changed (their stats version moved on)."""
    ready: frozenset[str] = frozenset()
    """Subscriptions that got messages visible right now (a lease may find something)."""
    hidden_until: dict[str, int] = field(default_factory=dict)
    """Per subscription, the earliest time (ms) a message hidden by this commit becomes visible again."""
    catalog: bool = False
    """Subscriptions were created, changed or deleted."""
    everything: bool = False
    """Anything may have changed (a networked notifier's periodic re-check, or a reconnection after which
    notifications may have been missed): every waiter reads again, and the subscriptions are read again."""

    def __bool__(self) -> bool:
        return bool(self.touched or self.ready or self.hidden_until or self.catalog or self.everything)


Listener = Callable[[Changes], None]


class Notifier(Protocol):
    async def start(self) -> None:
        """Begin hearing other replicas' commits (a networked notifier connects; an in-process one need not)."""
        ...

    async def close(self) -> None: ...

    def publish(self, changes: Changes) -> None:
        """Called by a store after the commit that made `changes`, on the event loop."""
        ...

    def listen(self, listener: Listener) -> None:
        """Call `listener` (on the event loop) for the changes of every commit, from any replica."""
        ...

    def unlisten(self, listener: Listener) -> None: ...


class InProcessNotifier:
    """One process, one store: a commit's changes go straight to this process's listeners."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def publish(self, changes: Changes) -> None:
        if not changes:
            return
        for listener in list(self._listeners):
            try:
                listener(changes)
            except Exception:  # one broken listener must not keep the others from hearing of a commit
                log.exception("a change listener failed")

    def listen(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def unlisten(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)
