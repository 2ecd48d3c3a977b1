"""The embedded store: one SQLite database in WAL mode, written from one thread.

Three modules, one class: `core` (plumbing, lifecycle, the log), `queues` (claims, leases,
outcomes, dead letters) and `subscriptions` (subscriptions, replays, retention); `schema` holds
the tables.
"""

from router.stores.sqlite.subscriptions import SQLiteEventStore

__all__ = ["SQLiteEventStore"]
