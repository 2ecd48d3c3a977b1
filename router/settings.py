"""The router's settings (`CATTUBE_*` variables)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

from pydantic import Field, field_validator

from router.push_policy import DEFAULT_NETWORKS, Network, parse_networks
from services.common.settings import CommonSettings

Durability = Literal["fsync", "batched"]
"""How soon a commit the router answers for (a publish's 202, an ack) reaches the disk (see `router_durability`)."""
DURABILITIES: tuple[str, ...] = get_args(Durability)


class RouterSettings(CommonSettings):
    router_database_url: str | None = Field(
        None,
        description="The router's database, overriding DATABASE_URL: sqlite:///relative.db, sqlite:////absolute.db"
        " or postgresql://user:password@host:port/database (any number of routers may share one);"
        " default the SQLite file BUS_PATH.",
    )
    database_pool_size: int = Field(10, ge=1, description="PostgreSQL: connections each router keeps at most.")
    database_statement_timeout_s: float = Field(
        30, gt=0, description="PostgreSQL: the longest a statement of the router's may run (statement_timeout)."
    )
    database_idle_in_transaction_timeout_s: float = Field(
        60,
        gt=0,
        description="PostgreSQL: a session of the router's left idle in a transaction this long is ended"
        " (idle_in_transaction_session_timeout), so it cannot hold back vacuum.",
    )
    database_recheck_s: float = Field(
        2.0,
        gt=0,
        description="PostgreSQL: how often every waiter looks again anyway (NOTIFY is best-effort; a lost one"
        " delays a wake-up by at most this long).",
    )
    bus_path: Path | None = Field(None, description="SQLite file of the bus; default DATA_DIR/router/bus.db.")
    retention_s: float = Field(7 * 86_400, gt=0, description="How long the bus keeps events (replay, dedup).")
    purge_interval_s: float = Field(3600, gt=0, description="How often expired events are purged.")
    router_durability: Durability | None = Field(
        None,
        description="fsync (default): each 202 and each ack is answered once it is on disk and survives power loss;"
        " batched: survives a process crash at once and power loss within a second (like Redis appendfsync"
        " everysec), for fewer fsyncs. Both engines: SQLite syncs its WAL, PostgreSQL sets synchronous_commit.",
    )
    sqlite_synchronous: Literal["FULL", "NORMAL"] | None = Field(
        None, description="Deprecated, ROUTER_DURABILITY says it: NORMAL is batched, FULL is fsync."
    )
    wal_limit_bytes: int = Field(
        64 * 1024 * 1024,
        ge=64 * 1024,
        description="Past this size the bus's WAL is checkpointed and truncated between two commits.",
    )
    max_streams: int = Field(
        100, ge=1, description="Streaming receives served at once (POST /subscriptions/{name}/stream); 503 beyond."
    )
    max_subscriptions: int = Field(
        10_000,
        ge=1,
        description="Subscriptions the router holds at most (every one is read again whenever any changes);"
        " creating one more gets 409.",
    )
    max_event_bytes: int = Field(256 * 1024, gt=0, description="Largest event accepted (413 above).")
    max_request_bytes: int = Field(16 * 1024 * 1024, gt=0, description="Largest publish request body.")
    push_allowed_networks: str = Field(
        DEFAULT_NETWORKS,
        description="Comma-separated CIDRs push targets may connect to (checked per connection); default loopback."
        " Link-local and metadata addresses only when a listed network lies within them.",
    )

    @field_validator("router_durability", mode="before")
    @classmethod
    def _durability_named(cls, value: object) -> object:
        # Refused at start, naming the variable and the choices (pydantic's own message names neither).
        if value is None or value in DURABILITIES:
            return value
        raise ValueError(
            f"CATTUBE_ROUTER_DURABILITY: expected fsync (every 202 and ack on disk before it is answered) or"
            f" batched (on disk within a second), got {value!r}"
        )

    @property
    def durability(self) -> Durability:
        """The durability mode: ROUTER_DURABILITY, else what the deprecated SQLITE_SYNCHRONOUS meant, else fsync."""
        if self.router_durability is not None:
            return self.router_durability
        return "batched" if self.sqlite_synchronous == "NORMAL" else "fsync"

    @field_validator("push_allowed_networks")
    @classmethod
    def _networks_parse(cls, value: str) -> str:
        parse_networks(value)
        return value

    @property
    def push_networks(self) -> list[Network]:
        return parse_networks(self.push_allowed_networks)

    @property
    def bus_file(self) -> Path:
        return self.bus_path or self.data_dir / "router" / "bus.db"
