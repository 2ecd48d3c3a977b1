"""The events every system carries, and what the consumer counts of them.

Each event is the same 1 KiB CloudEvent in structured JSON for every system; the producer stamps it
with `time.monotonic()` just before the publish call that carries it (CLOCK_MONOTONIC is one clock
for every process on the machine), so the consumer can tell each event's latency at receipt.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

EVENT_BYTES = 1024
_PAD = "x"


def new_event(source: str, n: int) -> dict[str, Any]:
    """Event `n` of a run, padded so that its JSON (once stamped) is about `EVENT_BYTES` long."""
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": f"{n:08d}",
        "source": source,
        "type": "bench.peers",
        "datacontenttype": "application/json",
        "data": {"n": n, "sent": time.monotonic(), "payload": ""},
    }
    event["data"]["payload"] = _PAD * max(0, EVENT_BYTES - len(json.dumps(event)))
    return event


def stamp(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    now = time.monotonic()
    for event in events:
        event["data"]["sent"] = now
    return events


class Tally:
    """Deliveries and acks seen by the consumer; `done` is set when `count` distinct events are acked."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.deliveries = 0
        self.latencies_s: list[float] = []
        self.first_delivery: float | None = None
        self.last_ack: float | None = None
        self._seen: set[int] = set()
        self._acked: set[int] = set()
        self.done = asyncio.Event()

    def delivered(self, event: bytes | dict[str, Any]) -> int:
        """Record one delivery (a JSON body or a parsed event) and return the event's number."""
        now = time.monotonic()
        data = (json.loads(event) if isinstance(event, bytes) else event)["data"]
        n: int = data["n"]
        self.deliveries += 1
        if self.first_delivery is None:
            self.first_delivery = now
        if n not in self._seen:
            self._seen.add(n)
            self.latencies_s.append(now - data["sent"])
        return n

    def completes(self, numbers: list[int]) -> bool:
        """Would acking these events complete the run?"""
        return not self.done.is_set() and len(self._acked) + len(set(numbers) - self._acked) >= self.count

    def acked(self, numbers: list[int]) -> None:
        self._acked.update(numbers)
        if len(self._acked) >= self.count and not self.done.is_set():
            self.last_ack = time.monotonic()
            self.done.set()

    @property
    def distinct_acked(self) -> int:
        return len(self._acked)

    def latency_ms(self, quantile: float) -> float | None:
        if not self.latencies_s:
            return None
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(len(ordered) * quantile))] * 1000
