"""The networked store: PostgreSQL (asyncpg), for any number of router replicas over one database.

Six modules, one class, as the SQLite store: `core` (connections, transactions), `log` (appends), `queues`
(claims, leases, outcomes, stats, dead letters), `subscriptions` (subscriptions, start positions and
their catch-up, replays), `retention` (dropping days of events); `schema` and `partitions` hold the
tables, and `notifier` tells other replicas of each commit (LISTEN/NOTIFY).
"""

from router.stores.postgres.core import Connection
from router.stores.postgres.retention import PostgresRetention


class PostgresEventStore(PostgresRetention):
    """The networked event store: one PostgreSQL database shared by every replica."""


__all__ = ["Connection", "PostgresEventStore"]
