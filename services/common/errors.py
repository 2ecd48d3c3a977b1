"""The one error tree every CatTube service raises and answers with.

    CatTubeError                 500  something went wrong on our side
     ├── BadRequest              400  a request that cannot be read at all (empty, malformed)
     ├── InvalidInput            422  a field had a value we cannot use (names the field and what was expected)
     │    └── PayloadTooLarge    413  a body or event over its limit
     ├── Unauthorized            401  a missing or wrong bearer token / signature
     ├── NotFound                404  no such resource
     ├── Conflict                409  the resource is in a state that forbids this
     ├── UnsupportedMedia        415  a body of a type we do not take
     ├── Unavailable             503  a dependency (the router, the bucket) cannot be reached now
     └── InsufficientStorage     507  the disk is full: nothing was written

Domain code raises these; `install_problem_handlers(app)` turns them into RFC 9457
`application/problem+json` answers. `errors` (a list of `{"field", "expected"}`) lets one
response name every bad part of a request, e.g. each bad entry of an event batch.
"""

from __future__ import annotations

from typing import Any


class CatTubeError(Exception):
    status = 500
    title = "Internal error"

    def __init__(self, detail: str, *, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors or []


class InvalidInput(CatTubeError):
    """A field had a value we cannot use. `field` is a dotted path, `expected` says what would do."""

    status = 422
    title = "Invalid input"

    def __init__(self, field: str, expected: str, *, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(f"{field}: expected {expected}", errors=errors or [{"field": field, "expected": expected}])
        self.field = field
        self.expected = expected


class BadRequest(InvalidInput):
    """A request that cannot be read at all: an empty body, a malformed multipart stream."""

    status = 400
    title = "Bad request"


class PayloadTooLarge(InvalidInput):
    status = 413
    title = "Payload too large"


class Unauthorized(CatTubeError):
    status = 401
    title = "Unauthorized"


class NotFound(CatTubeError):
    status = 404
    title = "Not found"


class Conflict(CatTubeError):
    status = 409
    title = "Conflict"


class UnsupportedMedia(CatTubeError):
    status = 415
    title = "Unsupported media type"


class Unavailable(CatTubeError):
    status = 503
    title = "Service unavailable"


class InsufficientStorage(CatTubeError):
    status = 507
    title = "Insufficient storage"
