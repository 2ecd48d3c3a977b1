"""How a replayed event is told apart from its first delivery."""

from __future__ import annotations

import json


def mark_replay(body: bytes, replay: str | None) -> bytes:
    """A replayed event goes out with a `replay` extension attribute naming its replay (spliced into the
    stored JSON object, which ends with `}`, rather than decoded and encoded again)."""
    if replay is None:
        return body
    return body[:-1] + b',"replay":' + json.dumps(replay).encode() + b"}"
