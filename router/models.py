"""Request and response bodies of the router's API (they also draw `/docs`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TargetIn(Strict):
    url: str | None = Field(None, pattern=r"^https?://", description="Push: the router POSTs each event here.")
    queue: dict[str, Any] | None = Field(None, description="Queue: `{}`; consumers receive, ack and nack.")

    @model_validator(mode="after")
    def exactly_one(self) -> TargetIn:
        if (self.url is None) == (self.queue is None):
            raise ValueError('exactly one of {"url": ...} or {"queue": {}}')
        return self

    def as_json(self) -> dict[str, Any]:
        return {"url": self.url} if self.url is not None else {"queue": {}}


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


class SubscriptionIn(Strict):
    pattern: dict[str, Any] | None = Field(
        None, description="EventBridge event pattern over the CloudEvent as JSON; null matches every event."
    )
    target: TargetIn
    delivery: DeliveryIn = Field(default_factory=DeliveryIn)
    start: Literal["latest", "earliest"] | int = Field(
        "latest", description="Where a new subscription starts: latest, earliest (replays the log) or a sequence."
    )

    @model_validator(mode="after")
    def start_is_a_sequence(self) -> SubscriptionIn:
        if isinstance(self.start, int) and self.start < 0:
            raise ValueError("start: a sequence is >= 0")
        return self


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
    max_messages: int = Field(1, ge=1, le=10)
    wait_s: float = Field(0, ge=0, le=20)
    visibility_timeout_s: float = Field(30, ge=0, le=43_200)


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
    pattern: dict[str, Any]
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
    start: int | AwareDatetime = Field(alias="from", description="First sequence, or RFC 3339 append time.")
    end: int | AwareDatetime | None = Field(None, alias="to", description="Last sequence or time; default: now.")

    @model_validator(mode="after")
    def sequences_are_positive(self) -> ReplayIn:
        for value in (self.start, self.end):
            if isinstance(value, int) and value < 0:
                raise ValueError("a sequence is >= 0")
        return self


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
