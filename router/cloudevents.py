"""CloudEvents 1.0 in JSON: parsing the three HTTP modes and validating each event.

An event is kept as the plain JSON object of the structured format: attributes at the top,
payload under `data` (JSON) or `data_base64` (bytes). That object is what patterns see,
what the bus stores and what consumers receive.

Attributes are checked against the CloudEvents 1.0 type system before anything else happens
(a value the store cannot hold must never reach a transaction shared with other publishes):
String (no control characters, noncharacters or lone surrogates), Integer (32-bit signed),
Boolean, URI (`dataschema`), Timestamp (`time`), Binary (`data_base64`). Extension names are
1-20 lowercase letters or digits; `partitionkey` is the partitioning extension's String.
`data` may be nested at most `MAX_DATA_DEPTH` deep and hold no lone surrogate anywhere.
An event that breaks these rules is not a CloudEvent: 400, naming the attribute.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from services.common import jsoncodec
from services.common.errors import BadRequest, InvalidInput, PayloadTooLarge

STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"

REQUIRED = ("id", "source", "type")
STRING_ATTRIBUTES = ("id", "source", "type", "subject", "datacontenttype", "dataschema")
EXTENSION_NAME = re.compile(r"[a-z0-9]{1,20}")
RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")
KNOWN = frozenset({"specversion", *STRING_ATTRIBUTES, "time", "data", "data_base64"})
# Extensions whose type a CloudEvents extension specification fixes.
STRING_EXTENSIONS = frozenset({"partitionkey"})
INT32 = range(-(2**31), 2**31)
# CloudEvents String: no C0/C1 controls, no surrogates (a lone one cannot even be encoded), no noncharacters.
NOT_A_STRING = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef\ufffe\uffff]")
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# JSON nesting allowed in `data` (objects and arrays). Real payloads nest a handful of levels;
# Python's own JSON encoder gives up near 1,000, and patterns walk what is stored.
MAX_DATA_DEPTH = 64
_NOT_STRUCTURE = bytes(set(range(256)) - set(b'[]{}"'))
_STRINGS_LEFT = re.compile(rb'"[^"]*"')
# Objects and arrays nest alike: the text keeps only `[`, `]` and quotes, `{}` written as `[]`.
_AS_BRACKETS = bytes.maketrans(b"{}", b"[]")


class Encoded(NamedTuple):
    """A validated event and its stored JSON encoding, made once when it is validated."""

    event: dict[str, Any]
    body: bytes


def encoded(event: dict[str, Any], *, plain: bool = False) -> Encoded:
    return Encoded(event, encode(event, plain=plain))


class EventError(BadRequest):
    """One bad event (400: not a CloudEvent); `index` says which entry of a batch it was (None outside a batch)."""

    def __init__(self, field: str, expected: str, index: int | None = None) -> None:
        where = field if index is None else f"[{index}].{field}"
        super().__init__(where, expected)
        self.index = index


def validate(event: Any, max_bytes: int, index: int | None = None, *, plain: bool = False) -> Encoded:
    """Check one structured-mode event; return it with its encoding. Raises EventError or PayloadTooLarge.

    `plain`: the event was read by the standard library's parser (jsoncodec.loads), so it is written
    back by its encoder too (it may hold NaN, which orjson would write as null)."""
    if not isinstance(event, dict):
        raise EventError("event", "a JSON object", index)
    if event.get("specversion") != "1.0":
        raise EventError("specversion", '"1.0"', index)
    for name in REQUIRED:
        value = event.get(name)
        if not isinstance(value, str) or not value:
            raise EventError(name, "a non-empty string", index)
    for name in STRING_ATTRIBUTES:
        if name in event:
            _check_string(name, event[name], index)
    if "dataschema" in event and not urlsplit(event["dataschema"]).scheme:
        raise EventError("dataschema", "an absolute URI", index)
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
        _check_extension(name, value, index)
    try:
        result = encoded(event, plain=plain)
    except (UnicodeEncodeError, RecursionError):
        _check_data(event.get("data"), index)
        raise  # not a fault of the data: let it be the 500 it is
    if (
        result.body.count(b"{") + result.body.count(b"[") > MAX_DATA_DEPTH
        and _nesting(result.body) > MAX_DATA_DEPTH + 1
    ):
        raise EventError("data", f"JSON nested at most {MAX_DATA_DEPTH} objects and arrays deep", index)
    if len(result.body) > max_bytes:
        where = "event" if index is None else f"[{index}]"
        raise PayloadTooLarge(where, f"an event of at most {max_bytes} bytes, got {len(result.body)}")
    return result


def _check_string(name: str, value: Any, index: int | None) -> None:
    if not isinstance(value, str):
        raise EventError(name, "a string", index)
    bad = NOT_A_STRING.search(value)
    if bad:
        found = f"U+{ord(bad.group()):04X}"
        raise EventError(
            name, f"a CloudEvents String: no control characters, surrogates or noncharacters ({found})", index
        )


def _check_extension(name: str, value: Any, index: int | None) -> None:
    if name in STRING_EXTENSIONS or isinstance(value, str):
        _check_string(name, value, index)
    elif isinstance(value, bool):
        pass
    elif isinstance(value, int):
        if value not in INT32:
            raise EventError(name, "a CloudEvents Integer: 32-bit signed, -2147483648 to 2147483647", index)
    else:
        raise EventError(name, "a string, a boolean or a 32-bit integer (the CloudEvents extension types)", index)


def _nesting(body: bytes) -> int:
    """How deep the JSON text `body` nests, measured on its text: a walk over the objects would cost
    ~100 µs for an event holding 80 small objects, this ~4 µs (it runs on every such publish)."""
    # Drop escaped backslashes, then escaped quotes (pairwise, left to right, as JSON reads them); keep
    # only brackets and quotes; then drop strings with any brackets inside them. `""` is either an
    # empty string or the end of one string and the start of the next: dropping it is exact.
    escapes_gone = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    brackets = escapes_gone.translate(_AS_BRACKETS, _NOT_STRUCTURE).replace(b'""', b"")
    if b'"' in brackets:
        brackets = _STRINGS_LEFT.sub(b"", brackets)
    depth = 0
    while brackets and depth <= MAX_DATA_DEPTH + 1:
        brackets = brackets.replace(b"[]", b"")  # one level a pass: replace does not rescan what it removed
        depth += 1
    return depth if not brackets else depth + 1


def _check_data(data: Any, index: int | None) -> None:
    """Refuse `data` nested over MAX_DATA_DEPTH or holding a lone surrogate, naming where (iteratively)."""
    stack: list[tuple[Any, str, int]] = [(data, "data", 0)]
    while stack:
        value, where, depth = stack.pop()
        if isinstance(value, str):
            if LONE_SURROGATE.search(value):
                raise EventError(where, "text without lone surrogates (U+D800 to U+DFFF cannot be encoded)", index)
        elif isinstance(value, dict | list):
            if depth >= MAX_DATA_DEPTH:
                raise EventError("data", f"JSON nested at most {MAX_DATA_DEPTH} objects and arrays deep", index)
            if isinstance(value, dict):
                for key, item in value.items():
                    if LONE_SURROGATE.search(key):
                        raise EventError(where, "keys without lone surrogates (U+D800 to U+DFFF)", index)
                    stack.append((item, f"{where}.{key}", depth + 1))
            else:
                stack.extend((item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value))


def parse(body: bytes, content_type: str, headers: Mapping[str, str], max_bytes: int) -> list[Encoded]:
    """Turn a POST body in any of the three modes into validated events (a batch is all-or-nothing)."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media == BATCH:
        entries, plain = _json(body, "body")
        if not isinstance(entries, list) or not entries:
            raise BadRequest("body", "a non-empty JSON array of CloudEvents")
        errors: list[dict[str, Any]] = []
        events: list[Encoded] = []
        for i, entry in enumerate(entries):
            try:
                events.append(validate(entry, max_bytes, i, plain=plain))
            except InvalidInput as exc:
                errors.extend(exc.errors)
                if isinstance(exc, PayloadTooLarge) and len(entries) == 1:
                    raise
        if errors:
            raise BadRequest("body", f"every entry a valid CloudEvent ({len(errors)} bad: see errors)", errors=errors)
        return events
    if media == STRUCTURED:
        event, plain = _json(body, "body")
        return [validate(event, max_bytes, plain=plain)]
    if "ce-specversion" in headers:
        event, plain = _from_binary(body, media, headers)
        return [validate(event, max_bytes, plain=plain)]
    raise InvalidInput(
        "header.content-type",
        f"{STRUCTURED}, {BATCH}, or binary mode (ce-specversion, ce-id, ce-source, ce-type headers)",
    )


def _from_binary(body: bytes, media: str, headers: Mapping[str, str]) -> tuple[dict[str, Any], bool]:
    """The event, and whether its data was read by the standard library's parser (see `validate`)."""
    event: dict[str, Any] = {}
    plain = False
    for name, value in headers.items():
        lower = name.lower()
        if lower.startswith("ce-"):
            event[lower[3:]] = value
    if media:
        event["datacontenttype"] = media
    if body:
        if not media:
            # No Content-Type (what the CloudEvents Python SDK sends for dict data): JSON if it parses,
            # as the SDK itself reads such a body, else bytes (RFC 9110 8.3: octet-stream). docs/decisions.md.
            try:
                event["data"], fast = jsoncodec.loads(body)
                plain = not fast
            except (ValueError, RecursionError):
                event["data_base64"] = base64.b64encode(body).decode()
        elif media == "application/json" or media.endswith("+json"):
            event["data"], plain = _json(body, "body")
        elif media.startswith("text/"):
            try:
                event["data"] = body.decode()
            except UnicodeDecodeError:
                raise BadRequest("body", "UTF-8 text for a text/* content type") from None
        else:
            event["data_base64"] = base64.b64encode(body).decode()
    return event, plain


def encode(event: Mapping[str, Any], *, plain: bool = False) -> bytes:
    """Compact UTF-8 JSON (orjson; the standard library's encoder with `plain`, see `validate`)."""
    return jsoncodec.dumps(event, plain=plain)


def _json(body: bytes, field: str) -> tuple[Any, bool]:
    """Parse JSON exactly as `json.loads` reads it, and say whether the standard library's parser did
    (`plain`, see `validate`); a syntax error is a 400 (RFC 9110: the request cannot be read), not a 422."""
    try:
        value, fast = jsoncodec.loads(body)
        return value, not fast
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(field, f"valid JSON ({exc})") from None
    except RecursionError:
        raise BadRequest(field, f"JSON nested at most {MAX_DATA_DEPTH} objects and arrays deep") from None


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
