"""The one way CatTube writes a moment: RFC 3339 in UTC, to the millisecond, with a `Z`.

    iso_utc(1700000000.191)   # "2023-11-14T22:13:20.191Z"
    iso_utc()                 # now

Every timestamp a service emits (event `time`, records, histories, dead letters) goes through it,
so clients comparing or displaying them see one shape whichever service wrote them.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

__all__ = ["iso_utc"]


def iso_utc(at: float | None = None) -> str:
    """`at` (seconds since the epoch; default now) as `YYYY-MM-DDTHH:MM:SS.mmmZ`."""
    moment = datetime.fromtimestamp(time.time() if at is None else at, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
