"""Request and response bodies of the router's API (they also draw `/docs`)."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

import pydantic
from pydantic import AwareDatetime, BaseModel, ConfigDict, Discriminator, Field, Tag


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


PUSH_URL = r"^https?://([A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?(/\S*)?$"
"""http(s), a host name or IP literal, an optional port and path: what aiohttp can connect to."""


MAX_SEQUENCE = 2**53 - 1
"""The largest integer every JSON parser reads exactly (JavaScript's too): far beyond any log's length."""


def _sequence(value: Any) -> Any:
    # JSON Schema's integer: 18 and 18.0, not true (Python's int) nor "18" (pydantic's lax int).
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError("a sequence: a whole number from 0")
    if value != int(value) or not 0 <= value <= MAX_SEQUENCE:
        raise ValueError("a sequence: a whole number from 0")
    return int(value)


Sequence = Annotated[
    int,
    pydantic.BeforeValidator(_sequence),
    pydantic.WithJsonSchema({"type": "integer", "minimum": 0, "maximum": MAX_SEQUENCE}),
]
"""A position in the log."""
RFC_3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")


def _rfc_3339(value: Any) -> Any:
    # pydantic would also read 5 or "5" as seconds since 1970: a client sending those meant a sequence.
    if not isinstance(value, str) or RFC_3339.fullmatch(value) is None:
        raise ValueError("an RFC 3339 time with its offset, e.g. 2026-11-30T12:00:00Z")
    return value


Instant = Annotated[AwareDatetime, pydantic.BeforeValidator(_rfc_3339)]
"""An RFC 3339 time with its offset (`format: date-time`)."""


class PushTarget(Strict):
    url: str = Field(pattern=PUSH_URL, max_length=2048, description="Push: the router POSTs each event here.")

    def as_json(self) -> dict[str, Any]:
        return {"url": self.url}


class QueueOptions(Strict):
    """No options yet: `{}`."""


class QueueTarget(Strict):
    queue: QueueOptions = Field(description="Queue: `{}`; consumers receive, ack and nack.")

    def as_json(self) -> dict[str, Any]:
        return {"queue": {}}


def _target_kind(value: Any) -> str:
    # Names the one branch to report errors for, instead of both. The tags are bracketed so that
    # problem details leave them out of field paths (`body.target.url`, services/common/problems.py).
    if isinstance(value, dict):
        return "[push]" if "url" in value else "[queue]"
    return "[push]" if isinstance(value, PushTarget) else "[queue]"


TargetIn = Annotated[
    Annotated[PushTarget, Tag("[push]")] | Annotated[QueueTarget, Tag("[queue]")], Discriminator(_target_kind)
]
"""Exactly one of `{"url": ...}` or `{"queue": {}}`."""


class DeliveryIn(Strict):
    max_attempts: int = Field(185, ge=1, le=185)
    max_age_s: int = Field(86_400, ge=60, le=86_400)
    timeout_s: float = Field(10.0, gt=0, le=300)
    backoff_initial_s: float = Field(1.0, gt=0, le=3600)
    backoff_max_s: float = Field(300.0, gt=0, le=86_400)
    max_in_flight: int = Field(16, ge=1, le=1024)
    ordered: bool = False
    max_receive_count: int = Field(5, ge=1, le=1000)
    mode: Literal["structured", "binary"] = "structured"


PATTERN_OUTLINE: dict[str, pydantic.JsonValue] = {"minProperties": 1}
"""What a schema can say of an EventBridge pattern; its grammar and limits are the compiler's (patterns.py)."""


class SubscriptionIn(Strict):
    pattern: dict[str, Any] | None = Field(
        None,
        description="EventBridge event pattern over the CloudEvent as JSON; null matches every event.",
        json_schema_extra=PATTERN_OUTLINE,
    )
    target: TargetIn
    delivery: DeliveryIn = Field(default_factory=DeliveryIn)
    start: Literal["latest", "earliest"] | Sequence = Field(
        "latest", description="Where a new subscription starts: latest, earliest (replays the log) or a sequence."
    )


class SubscriptionOut(BaseModel):
    name: str
    pattern: dict[str, Any] | None
    target: dict[str, Any]
    delivery: DeliveryIn
    start_sequence: int
    created_at: str
    secret: str | None = Field(None, description="Push targets: the Standard Webhooks signing secret.")
    owner: str = Field("service", description="The scope that created it; only admin may change an admin's.")


class SubscriptionList(BaseModel):
    items: list[SubscriptionOut]


class ReceiveIn(Strict):
    max_messages: int = Field(1, ge=1, le=1000)
    wait_s: float = Field(0, ge=0, le=20)
    visibility_timeout_s: float = Field(30, ge=0, le=43_200)


class StreamIn(Strict):
    prefetch: int = Field(
        100, ge=1, le=1000, description="At most this many messages leased to the stream and not yet acked or nacked."
    )
    visibility_timeout_s: float = Field(
        30, gt=0, le=43_200, description="Each message is hidden this long from its lease, as receive's."
    )
    heartbeat_s: float = Field(15, ge=0.05, le=60, description="A heartbeat line after this long without a message.")


class AckIn(Strict):
    receipts: list[str] = Field(min_length=1, max_length=100)


class NackIn(AckIn):
    delay_s: float = Field(0, ge=0, le=43_200)


class ExtendIn(AckIn):
    visibility_timeout_s: float = Field(ge=0, le=43_200)


class ReceiptOut(BaseModel):
    receipt: str
    ok: bool
    error: str | None = None


class ReceiptsOut(BaseModel):
    results: list[ReceiptOut]


class StatsOut(BaseModel):
    backlog: int = Field(description="Messages ready to be received now.")
    in_flight: int = Field(description="Received and not yet acked, within their visibility timeout.")
    delayed: int = Field(description="Nacked with a delay, not yet visible.")
    dead_lettered: int
    oldest_age_s: float
    version: int = Field(description="Changes whenever the numbers do; pass it back with wait_s to long-poll.")
    delivered_total: int
    failed_total: int


class PublishResult(BaseModel):
    id: str
    sequence: int
    duplicate: bool


class PublishOut(BaseModel):
    results: list[PublishResult]


class PatternTestIn(Strict):
    pattern: dict[str, Any] = Field(json_schema_extra=PATTERN_OUTLINE)
    event: dict[str, Any]


class PatternTestOut(BaseModel):
    match: bool


class CountOut(BaseModel):
    count: int


class ReplayIn(Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$", description="Names the replay; default replay-<time>."
    )
    start: Sequence | Instant = Field(alias="from", description="First sequence, or RFC 3339 append time.")
    end: Sequence | Instant | None = Field(None, alias="to", description="Last sequence or time; default: now.")


class ReplayOut(BaseModel):
    name: str
    subscription: str
    from_sequence: int
    to_sequence: int
    total: int = Field(description="Matching events queued by the replay.")
    delivered: int
    pending: int
    dead_lettered: int
    done: bool
    created_at: str
