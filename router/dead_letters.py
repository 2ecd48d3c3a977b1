"""Dead-letter policy: when a queue message is given up on, and how the bus announces it.

Push outcomes decide their own dead letters (router.delivery: permanent failures, `max_attempts`,
`max_age_s`); the rule here is the queue's: a message received `max_receive_count` times without an
ack goes to the dead letters instead of out again. Either way, the store moves the message and
appends the announcement built here in the same transaction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from router import announcements
from router.cloudevents import Encoded, encoded


@dataclass(frozen=True, slots=True)
class Verdict:
    reason: str
    context: dict[str, Any]


def over_receive_limit(attempts: int, max_receive_count: int | None, last_error: str | None) -> Verdict | None:
    """A queue message received `attempts` times already: dead-letter it rather than hand it out again?"""
    if max_receive_count is None or attempts < max_receive_count:
        return None
    limit = f"max_receive_count {max_receive_count}"
    return Verdict(
        f"received {attempts} times without an ack ({limit})", {"limit": "max_receive_count", "error": last_error}
    )


def announcement(
    subscription: str, message_id: int, body: bytes, attempts: int, reason: str, context: dict[str, Any]
) -> Encoded:
    """`cattube.router.dead-lettered` for one message, ready to append (and fan out) like any event."""
    return encoded(announcements.dead_lettered(subscription, message_id, json.loads(body), attempts, reason, context))
