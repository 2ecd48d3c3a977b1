"""CloudEvents 1.0 in JSON: parsing the three HTTP modes and validating each event.

An event is kept as the plain JSON object of the structured format: attributes at the top,
payload under `data` (JSON) or `data_base64` (bytes). That object is what patterns see,
what the bus stores and what consumers receive.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any, NamedTuple

from services.common.errors import InvalidInput, PayloadTooLarge

STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"

REQUIRED = ("id", "source", "type")
STRING_ATTRIBUTES = ("id", "source", "type", "subject", "datacontenttype", "dataschema")
EXTENSION_NAME = re.compile(r"[a-z0-9]{1,20}")
RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")
KNOWN = frozenset({"specversion", *STRING_ATTRIBUTES, "time", "data", "data_base64"})


class Encoded(NamedTuple):
    """A validated event and its stored JSON encoding, made once when it is validated."""

    event: dict[str, Any]
    body: bytes


def encoded(event: dict[str, Any]) -> Encoded:
    return Encoded(event, encode(event))


class EventError(InvalidInput):
    """One bad event; `index` says which entry of a batch it was (None outside a batch)."""

    def __init__(self, field: str, expected: str, index: int | None = None) -> None:
        where = field if index is None else f"[{index}].{field}"
        super().__init__(where, expected)
        self.index = index


def validate(event: Any, max_bytes: int, index: int | None = None) -> Encoded:
    """Check one structured-mode event; return it with its encoding. Raises EventError or PayloadTooLarge."""
    if not isinstance(event, dict):
        raise EventError("event", "a JSON object", index)
    if event.get("specversion") != "1.0":
        raise EventError("specversion", '"1.0"', index)
    for name in REQUIRED:
        value = event.get(name)
        if not isinstance(value, str) or not value:
            raise EventError(name, "a non-empty string", index)
    for name in STRING_ATTRIBUTES:
        if name in event and not isinstance(event[name], str):
            raise EventError(name, "a string", index)
    if "time" in event and not (isinstance(event["time"], str) and _is_rfc3339(event["time"])):
        raise EventError("time", "an RFC 3339 timestamp such as 2026-11-28T10:00:00Z", index)
    if "data" in event and "data_base64" in event:
        raise EventError("data_base64", "absent when data is present", index)
    if "data_base64" in event and not _is_base64(event["data_base64"]):
        raise EventError("data_base64", "a base64 string", index)
    for name, value in event.items():
        if name in KNOWN:
            continue
        if not EXTENSION_NAME.fullmatch(name):
            raise EventError(name, "an extension attribute name of 1-20 lowercase letters or digits", index)
        if not isinstance(value, str | int | float | bool):
            raise EventError(name, "a string, number or boolean extension value", index)
    result = encoded(event)
    if len(result.body) > max_bytes:
        where = "event" if index is None else f"[{index}]"
        raise PayloadTooLarge(where, f"an event of at most {max_bytes} bytes, got {len(result.body)}")
    return result


def parse(body: bytes, content_type: str, headers: Mapping[str, str], max_bytes: int) -> list[Encoded]:
    """Turn a POST body in any of the three modes into validated events (a batch is all-or-nothing)."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media == BATCH:
        entries = _json(body, "body")
        if not isinstance(entries, list) or not entries:
            raise InvalidInput("body", "a non-empty JSON array of CloudEvents")
        errors: list[dict[str, Any]] = []
        events: list[Encoded] = []
        for i, entry in enumerate(entries):
            try:
                events.append(validate(entry, max_bytes, i))
            except InvalidInput as exc:
                errors.extend(exc.errors)
                if isinstance(exc, PayloadTooLarge) and len(entries) == 1:
                    raise
        if errors:
            raise InvalidInput("body", f"every entry a valid CloudEvent ({len(errors)} bad: see errors)", errors=errors)
        return events
    if media == STRUCTURED:
        return [validate(_json(body, "body"), max_bytes)]
    if "ce-specversion" in headers:
        return [validate(_from_binary(body, media, headers), max_bytes)]
    raise InvalidInput(
        "header.content-type",
        f"{STRUCTURED}, {BATCH}, or binary mode (ce-specversion, ce-id, ce-source, ce-type headers)",
    )


def _from_binary(body: bytes, media: str, headers: Mapping[str, str]) -> dict[str, Any]:
    event: dict[str, Any] = {}
    for name, value in headers.items():
        lower = name.lower()
        if lower.startswith("ce-"):
            event[lower[3:]] = value
    if media:
        event["datacontenttype"] = media
    if body:
        if media == "application/json" or media.endswith("+json"):
            event["data"] = _json(body, "body")
        elif media.startswith("text/"):
            try:
                event["data"] = body.decode()
            except UnicodeDecodeError:
                raise InvalidInput("body", "UTF-8 text for a text/* content type") from None
        else:
            event["data_base64"] = base64.b64encode(body).decode()
    return event


def encode(event: Mapping[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()


def _json(body: bytes, field: str) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(field, f"valid JSON ({exc})") from None


def _is_rfc3339(value: str) -> bool:
    if not RFC3339.fullmatch(value):
        return False
    try:
        datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def _is_base64(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        base64.b64decode(value, validate=True)
    except ValueError:
        return False
    return True
