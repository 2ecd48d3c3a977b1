"""The storage port behind the bus: what the router needs from a durable store, and its records.

`EventStore` has two implementations, the embedded SQLite one (`router.stores.sqlite`) and the networked
PostgreSQL one (`router.stores.postgres`, shared by any number of replicas), and one contract test suite
(`tests/router/test_store_contract.py`, parametrized over store factories) that both pass. Times are
integer milliseconds since the epoch, passed in by the caller so tests can control the clock.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from router.cloudevents import Encoded
from router.patterns import Pattern, PatternError, compile_pattern
from services.common.errors import Conflict

if TYPE_CHECKING:
    from router.fanout import Fanout
    from router.notifier import Notifier

log = logging.getLogger(__name__)


def now_ms() -> int:
    """The wall clock in ms: the `now_ms` every store method takes, and what `visible_at` is written in."""
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True)
class Delivery:
    """How a subscription's events are handed out (docs/architecture.md, Shapes clients rely on: `delivery`)."""

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
    changes: int = 0
    """The subscription's change counter: moved on by every commit that touches its queue (router.bus
    derives the stats `version` from it and the numbers, so any replica answers the same version)."""


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


class EventStore(Protocol):
    """A durable, append-only event log with per-subscription message queues: it stores, claims and counts.

    The rules live in the bus and its engine-neutral modules, which a store calls: which subscriptions
    an event goes to (`router.fanout`), when a queue message is dead-lettered and how that is announced
    (`router.dead_letters`), the receipt format (`router.receipts`), how a replayed event is marked
    (`router.replays`). Every method commits before it returns: once a call has answered, a crash loses
    nothing it did. After each commit that changes a queue or the subscriptions, the store publishes
    what changed through the notifier given to `open` (router.notifier), and moves each touched
    subscription's change counter (`Stats.changes`) on in the same transaction.

    Leases (queue receives and push leases) record the `replica_id` that holds them and their expiry
    (the moment the message is visible again); an expired lease is claimed again by anyone.
    """

    replica_id: str
    """Names this process's leases: random per start, so a restarted router is another holder."""
    write_failure: str | None
    """Why the last commit failed for want of storage (disk full, I/O error); None once one succeeds.
    The router is not ready meanwhile, and publishes answer 507."""

    async def open(self, notifier: Notifier, fanout: Fanout) -> None:
        """Open the store. A networked store whose database is away does not fail here: it answers `Unavailable`
        meanwhile, keeps connecting, and publishes `Changes(catalog=True, everything=True)` once it can."""
        ...

    async def close(self) -> None: ...

    async def readiness(self) -> str | None:
        """None when the store can be used now, else a sentence saying why not (its database is away)."""
        ...

    async def append(self, events: Sequence[Encoded], now_ms: int) -> list[Appended]:
        """Store events in one transaction, skipping repeats of `source`+`id`, and queue each new one
        for every subscription `fanout.targets` names, in the same transaction (leased at once, attempt 1, for
        the grant's lease and held by this replica, when it names a grant of an idle dispatcher or a waiting
        stream; those messages go to `fanout.hand_off` after the commit, or to `fanout.rolled_back`)."""
        ...

    async def put_subscription(
        self, spec: SubscriptionSpec, now_ms: int, *, max_subscriptions: int | None = None
    ) -> tuple[Subscription, bool]:
        """Create or update; returns the subscription and whether it was created. On creation the
        retained events from the start position are queued for it in the same transaction. Creating one
        when `max_subscriptions` exist already raises `Conflict` (checked in the creating transaction, so
        concurrent creations on any replica never pass the bound together)."""
        ...

    async def get_subscription(self, name: str) -> Subscription | None:
        """Read from the database (the bus serves reads from its `Fanout` cache)."""
        ...

    async def list_subscriptions(self) -> list[Subscription]: ...

    async def load_subscriptions(self) -> tuple[int, list[Subscription]]:
        """Every subscription, with the catalog version they were read at (one read)."""
        ...

    async def delete_subscription(self, name: str) -> bool: ...

    async def receive(
        self, name: str, max_messages: int, visibility_timeout_ms: int, now_ms: int, max_receive_count: int
    ) -> list[Message]:
        """Lease up to `max_messages` visible messages; one already received `max_receive_count` times is
        dead-lettered (`router.dead_letters`) instead of being handed out again."""
        ...

    async def ack(self, name: str, receipts: Sequence[str], now_ms: int) -> list[ReceiptResult]: ...

    async def nack(
        self, name: str, receipts: Sequence[str], delay_ms: int, now_ms: int, error: str | None = None
    ) -> list[ReceiptResult]:
        """Release leases; the messages become visible again after `delay_ms` (`error` is kept for a dead letter)."""
        ...

    async def lease(self, name: str, max_messages: int, lease_ms: int, now_ms: int, ordered: bool) -> list[Message]:
        """Push delivery's receive: no max_receive_count; when `ordered`, only the oldest pending message
        of each partition key is eligible, and not while it is itself leased or waiting to be retried."""
        ...

    async def settle(self, name: str, settlements: Sequence[Settlement], now_ms: int) -> list[ReceiptResult]:
        """Record the outcomes of many push deliveries in one transaction."""
        ...

    async def release(self, name: str, receipts: Sequence[str], now_ms: int) -> None:
        """Undo a receive whose client went away: visible again now, the attempt not counted."""
        ...

    async def release_leases(self, name: str, now_ms: int) -> int:
        """A push dispatcher starting up: make visible now the subscription's leases held by this replica
        (`replica_id`: none of them is being delivered any more). Leases of other holders are left to
        expire, live replicas' and earlier incarnations' alike: an expired one is claimed again anyway."""
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
        """When the earliest message hidden (in flight or delayed) beyond `now_ms` becomes visible; None if none is.
        (The bus asks beyond a moment past, too: router.signals.)"""
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


class SpecCache:
    """The parsed specs of a store's last full read of its subscriptions, to parse only what changed.

    Every change to the catalog (any replica's) makes the bus and the fan-out read all subscriptions
    again, and parsing a spec (its JSON, then compiling its pattern) costs ~15 us where reading its row
    costs ~2 us: with 2,000 subscriptions, creating them one after another ran at 6.5 PUTs/s, most
    of it re-parsing specs that had not changed. A spec is parsed again only when its stored text did
    (specs are immutable: one object may serve every read that finds the same text). Each full read
    keeps exactly the names it found, so the cache holds no more than the catalog does.
    """

    def __init__(self) -> None:
        self._specs: dict[str, tuple[str, SubscriptionSpec]] = {}

    def subscriptions(self, rows: Iterable[tuple[str, str, str, int, int]]) -> list[Subscription]:
        """Rows of (name, spec JSON, secret, created_at, start_seq): every subscription there is."""
        before, kept = self._specs, {}
        subs = []
        for name, text, secret, created_at, start_seq in rows:
            known = before.get(name)
            spec = known[1] if known is not None and known[0] == text else spec_from_json(name, text)
            kept[name] = (text, spec)
            subs.append(Subscription(spec, secret, created_at, start_seq))
        self._specs = kept  # one swap: a read running alongside (another thread) started from the old dict
        return subs


def over_subscription_limit(count: int, limit: int) -> Conflict:
    return Conflict(
        f"the router holds {count} subscriptions, its limit (CATTUBE_MAX_SUBSCRIPTIONS={limit}): "
        "delete one first, or raise the limit"
    )


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
