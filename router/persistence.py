"""The storage port behind the bus: what the router needs from a durable store, and its records.

`EventStore` has one implementation today, the embedded SQLite one (`router.stores.sqlite`), and one
contract test suite (`tests/router/test_store_contract.py`, parametrized over implementations).
A networked store (PostgreSQL, not written yet) would implement this protocol and have to pass
those same tests. Times are integer milliseconds since the epoch, passed in by the caller so
tests can control the clock.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

from router.cloudevents import Encoded
from router.patterns import Pattern, PatternError, compile_pattern

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Delivery:
    """How a subscription's events are handed out (DESIGN.md, Shapes: `delivery`)."""

    max_attempts: int = 185
    max_age_s: int = 86_400
    timeout_s: float = 10.0
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 300.0
    max_in_flight: int = 16
    ordered: bool = False
    max_receive_count: int = 5
    mode: str = "structured"


@dataclass(frozen=True, slots=True)
class SubscriptionSpec:
    """What a client PUTs. `pattern` is the raw JSON; `compiled` its compiled form (None = every event)."""

    name: str
    pattern: dict[str, Any] | None
    compiled: Pattern | None
    target: dict[str, Any]
    delivery: Delivery = field(default_factory=Delivery)
    start: str | int = "latest"
    owner: str = "service"
    """The scope that created it: "admin" ones are out of a service token's reach (docs/decisions.md)."""

    @property
    def is_queue(self) -> bool:
        return "queue" in self.target

    def same_as(self, other: SubscriptionSpec) -> bool:
        """Equal in everything a re-PUT can change (the start position only applies on creation)."""
        return (self.pattern, self.target, self.delivery) == (other.pattern, other.target, other.delivery)

    def matches(self, event: dict[str, Any]) -> bool:
        return self.compiled is None or self.compiled.matches(event)


@dataclass(frozen=True, slots=True)
class Subscription:
    spec: SubscriptionSpec
    secret: str
    created_at_ms: int
    start_sequence: int


@dataclass(frozen=True, slots=True)
class Appended:
    id: str
    sequence: int
    duplicate: bool


@dataclass(frozen=True, slots=True)
class Message:
    receipt: str
    attempt: int
    sequence: int
    event: bytes
    """The CloudEvent as stored JSON bytes (spliced into responses without re-encoding)."""
    enqueued_at_ms: int = 0
    replay: str | None = None


@dataclass(frozen=True, slots=True)
class ReceiptResult:
    receipt: str
    ok: bool
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Settlement:
    """How one push delivery ended: acked, to be retried after `delay_ms`, or dead-lettered."""

    receipt: str
    kind: Literal["ack", "retry", "dead"]
    delay_ms: int = 0
    error: str | None = None
    context: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Stats:
    backlog: int
    in_flight: int
    delayed: int
    dead_lettered: int
    oldest_age_s: float
    delivered_total: int
    failed_total: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    sequence: int
    event: bytes
    attempts: int
    last_error: str
    dead_lettered_at_ms: int
    context: dict[str, Any] = field(default_factory=dict)
    """What led to it: `limit` exhausted, HTTP `status`, `error`, `last_attempt_at`."""


@dataclass(frozen=True, slots=True)
class Replay:
    name: str
    subscription: str
    from_sequence: int
    to_sequence: int
    total: int
    delivered: int
    pending: int
    dead_lettered: int
    created_at_ms: int


class ChangeListener(Protocol):
    def __call__(self, touched: set[str], hidden_until: dict[str, int], handoffs: dict[str, list[Message]]) -> None:
        """Called on the event loop after a commit: `touched` subscriptions had their queue change;
        `hidden_until[name]` is the earliest time a message that was just hidden becomes visible;
        `handoffs[name]` are messages leased in the commit to an idle push dispatcher (see `offer`)."""


class EventStore(Protocol):
    """A durable, append-only event log with per-subscription message queues.

    Every method commits before it returns: once a call has answered, a crash loses nothing it did.
    After each commit that changes a queue, the store calls `listener` (set by the bus), which wakes
    long polls and moves the subscription's stats `version` on.
    """

    listener: ChangeListener | None
    write_failure: str | None
    """Why the last commit failed for want of storage (disk full, I/O error); None once one succeeds.
    The router is not ready meanwhile, and publishes answer 507."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def append(self, events: Sequence[Encoded], now_ms: int) -> list[Appended]:
        """Store events in one transaction, skipping repeats of `source`+`id`, and queue each new one
        for every subscription whose pattern matches, in the same transaction."""
        ...

    async def put_subscription(self, spec: SubscriptionSpec, now_ms: int) -> tuple[Subscription, bool]:
        """Create or update; returns the subscription and whether it was created. On creation the
        retained events from the start position are queued for it in the same transaction."""
        ...

    async def get_subscription(self, name: str) -> Subscription | None: ...

    async def list_subscriptions(self) -> list[Subscription]: ...

    async def delete_subscription(self, name: str) -> bool: ...

    async def receive(self, name: str, max_messages: int, visibility_timeout_ms: int, now_ms: int) -> list[Message]:
        """Lease up to `max_messages` visible messages; a message received `max_receive_count` times
        already is dead-lettered (and announced on the bus) instead of being handed out again."""
        ...

    async def ack(self, name: str, receipts: Sequence[str], now_ms: int) -> list[ReceiptResult]: ...

    async def nack(
        self, name: str, receipts: Sequence[str], delay_ms: int, now_ms: int, error: str | None = None
    ) -> list[ReceiptResult]:
        """Release leases; the messages become visible again after `delay_ms` (`error` is kept for a dead letter)."""
        ...

    async def lease(self, name: str, max_messages: int, lease_ms: int, now_ms: int) -> list[Message]:
        """Push delivery's receive: no max_receive_count; with `ordered` delivery only the oldest pending
        message of each partition key is eligible."""
        ...

    async def settle(self, name: str, settlements: Sequence[Settlement], now_ms: int) -> list[ReceiptResult]:
        """Record the outcomes of many push deliveries in one transaction."""
        ...

    async def release(self, name: str, receipts: Sequence[str], now_ms: int) -> None:
        """Undo a receive whose client went away: visible again now, the attempt not counted."""
        ...

    async def release_leases(self, name: str, now_ms: int) -> int:
        """Make every leased message of the subscription visible now (a push dispatcher starting up)."""
        ...

    def offer(self, name: str, slots: int, lease_ms: int) -> None:
        """An idle push dispatcher grants `slots`: appends lease matching events to it in their own
        transaction and hand them over through the listener, so they go out without a lease round trip."""
        ...

    def withdraw(self, name: str) -> int:
        """Take the offer back; returns the slots not handed off."""
        ...

    def may_have_ready(self, name: str) -> bool:
        """Whether a lease might find something (False only when it cannot)."""
        ...

    def mark_ready(self, name: str) -> None:
        """A hidden message may have become visible."""
        ...

    async def replay(self, name: str, replay: str, from_seq: int, to_seq: int, now_ms: int) -> Replay:
        """Queue the retained events between two sequences that match the subscription, marked `replay`."""
        ...

    async def replay_status(self, name: str, replay: str) -> Replay | None: ...

    async def sequence_at(self, at_ms: int) -> int:
        """The first sequence appended at or after `at_ms`."""
        ...

    async def extend(
        self, name: str, receipts: Sequence[str], visibility_timeout_ms: int, now_ms: int
    ) -> list[ReceiptResult]: ...

    async def next_visible_ms(self, name: str, now_ms: int) -> int | None:
        """When the earliest hidden (in flight or delayed) message becomes visible; None if none is hidden."""
        ...

    async def stats(self, name: str, now_ms: int) -> Stats: ...

    async def dead_letters(self, name: str, limit: int) -> list[DeadLetter]: ...

    async def redrive(self, name: str, now_ms: int) -> int:
        """Put every dead letter back as a fresh message (attempts start again)."""
        ...

    async def purge_dead_letters(self, name: str) -> int: ...

    async def purge_expired(self, before_ms: int) -> int:
        """Drop events older than `before_ms` that no queue still holds; returns how many."""
        ...


def spec_to_json(spec: SubscriptionSpec) -> str:
    """The stored form of a subscription's definition (the start position is kept apart)."""
    return json.dumps(
        {"pattern": spec.pattern, "target": spec.target, "delivery": asdict(spec.delivery), "owner": spec.owner}
    )


def _compile_stored(name: str, pattern: dict[str, Any]) -> Pattern:
    """Stored patterns were checked when they were PUT; ones stored before the limits existed still load.

    One that no longer compiles (stored by a laxer router, or nested near Python's recursion
    limit) matches nothing, loudly, rather than stop the router from starting.
    """
    try:
        return compile_pattern(pattern, limits=None)
    except (PatternError, RecursionError) as exc:
        log.error("subscription %s: its stored pattern cannot be compiled (%s); it matches nothing", name, exc)
        return Pattern((), ())


def spec_from_json(name: str, text: str) -> SubscriptionSpec:
    raw = json.loads(text)
    pattern = raw["pattern"]
    return SubscriptionSpec(
        name=name,
        pattern=pattern,
        compiled=None if pattern is None else _compile_stored(name, pattern),
        target=raw["target"],
        delivery=Delivery(**raw["delivery"]),
        owner=raw.get("owner", "service"),  # stored before scoped tokens: every caller was a service
    )
