"""Small builders for test events."""

from __future__ import annotations

import itertools
from typing import Any

_ids = itertools.count(1)


def event(type: str = "cattube.test.happened", source: str = "tests", **fields: Any) -> dict[str, Any]:
    return {"specversion": "1.0", "id": fields.pop("id", f"e{next(_ids)}"), "source": source, "type": type, **fields}


STRUCTURED = {"Content-Type": "application/cloudevents+json"}
BATCH = {"Content-Type": "application/cloudevents-batch+json"}
