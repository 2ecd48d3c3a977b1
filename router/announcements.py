"""Events the router itself publishes on its bus."""

from __future__ import annotations

from typing import Any

from services.common.timestamps import iso_utc

SOURCE = "cattube/router"


def dead_lettered(
    subscription: str,
    message_id: int,
    event: dict[str, Any],
    attempts: int,
    last_error: str,
    context: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`cattube.router.dead-lettered`: one message given up on, with enough context to act on it."""
    return {
        "specversion": "1.0",
        "id": f"dead-letter-{subscription}-{message_id}",
        "source": SOURCE,
        "type": "cattube.router.dead-lettered",
        "time": iso_utc(),
        "datacontenttype": "application/json",
        **({"partitionkey": event["partitionkey"]} if "partitionkey" in event else {}),
        "data": {
            "subscription": subscription,
            "event_id": event.get("id"),
            "event_source": event.get("source"),
            "event_type": event.get("type"),
            "attempts": attempts,
            "last_error": last_error,
            **(context or {}),
        },
    }
