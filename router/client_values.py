"""The router SDK's values, errors and small helpers (router.client re-exports the public ones)."""

from __future__ import annotations

import functools
import random
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from services.common import jsoncodec
from services.common.timestamps import iso_utc

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


def full_jitter(attempt: int, initial_s: float, max_s: float) -> float:
    """Exponential backoff with full jitter: a delay drawn from [0, min(max_s, initial_s * 2**attempt)].

    await asyncio.sleep(full_jitter(failures, 0.2, 10.0))
    """
    return random.uniform(0, min(max_s, initial_s * 2**attempt))


class RouterError(Exception):
    """The router refused a request. `status` is the HTTP status, `problem` the problem+json body."""

    def __init__(self, status: int, problem: Mapping[str, Any]) -> None:
        super().__init__(f"{status} {problem.get('title', '')}: {problem.get('detail', '')}".strip())
        self.status = status
        self.problem = dict(problem)


class RouterUnavailable(RouterError):
    """The router could not be reached, or answered 5xx, until the retries ran out."""


@dataclass(frozen=True, slots=True)
class PublishResult:
    id: str
    sequence: int
    duplicate: bool


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    receipt: str
    attempt: int
    sequence: int
    event: dict[str, Any]

    @property
    def data(self) -> Any:
        return self.event.get("data")


@dataclass(frozen=True, slots=True)
class QueueStats:
    backlog: int
    in_flight: int
    delayed: int
    dead_lettered: int
    oldest_age_s: float
    version: int
    delivered_total: int
    failed_total: int


def new_event(
    type: str,
    source: str,
    data: Any,
    *,
    id: str | None = None,
    partitionkey: str | None = None,
    subject: str | None = None,
    **extensions: str | int | bool,
) -> dict[str, Any]:
    """A CloudEvent (structured JSON) with a fixed id, ready to publish.

    Give `id` when the event stands for something with an identity of its own (the video id for
    `cattube.video.uploaded`), so a repeat publish after a crash is recognized as the same event.

        new_event("cattube.video.uploaded", "cattube/upload", {"video_id": "v1"}, id="v1", partitionkey="v1")
    """
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": id or str(uuid.uuid4()),
        "source": source,
        "type": type,
        "time": iso_utc(),
        "datacontenttype": "application/json",
        "data": data,
    }
    if partitionkey is not None:
        event["partitionkey"] = partitionkey
    if subject is not None:
        event["subject"] = subject
    event.update(extensions)
    return event


@functools.lru_cache(maxsize=1024)
def parse_url(text: str) -> httpx.URL:
    """A parsed URL (immutable, so shared): parsing one costs as much as the rest of building a request."""
    return httpx.URL(text)


def json_body(response: httpx.Response) -> Any:
    """A JSON answer, read as `json.loads` reads it, at orjson's speed (services/common/jsoncodec.py)."""
    return jsoncodec.loads(response.content)[0]


def unreachable_problem(exc: httpx.TransportError) -> dict[str, Any]:
    return {"title": "Router unreachable", "detail": f"{type(exc).__name__}: {exc}"}


def problem_of(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {"title": response.reason_phrase, "detail": response.text[:500]}
    return body if isinstance(body, dict) else {"title": response.reason_phrase, "detail": str(body)[:500]}
