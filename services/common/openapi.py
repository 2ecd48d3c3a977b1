"""The OpenAPI document, made to tell the truth about errors and auth.

FastAPI documents the happy path and a 422 whose body (`HTTPValidationError`) we never send. Every
CatTube error is `application/problem+json` (services/common/problems.py), and some answers come from
layers FastAPI does not see: the bearer-auth middleware (401/403), the body bound (413), malformed
JSON (400), the connection cap (503). `document_problems(app)` rewrites the generated document once,
when it is first asked for:

- every error response a route declares, or that its shape implies, is documented as problem+json
  with one `Problem` schema: 400/413/422 where a request body or parameters are read, 404 where the
  path names a resource, 503 everywhere (the connection cap), and the 401/403 that
  `services.common.auth.protect` adds to guarded routes.

A route adds its own statuses with FastAPI's `responses=` (e.g. `responses=problems(409)`); the
description and problem+json body are filled in here.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI

from services.common.problems import PROBLEM_JSON

PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "RFC 9457 problem details; `errors` names each bad field and what was expected.",
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["field", "expected"],
                "properties": {"field": {"type": "string"}, "expected": {"type": "string"}},
            },
        },
    },
}
PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}

DESCRIPTIONS = {
    400: "The request cannot be read (malformed JSON or body)",
    401: "Missing or wrong bearer token",
    403: "The token lacks the scope this operation needs",
    404: "No such resource",
    405: "Method not allowed",
    409: "The resource is in a state that forbids this",
    412: "A precondition of the protocol is not met (tus: the Tus-Resumable version)",
    413: "Body over its limit",
    415: "Unsupported media type",
    416: "Range not satisfiable",
    422: "A field has a value that cannot be used (named in `errors`)",
    460: "Checksum mismatch (tus: the body's Upload-Checksum)",
    503: "Overloaded, or a dependency cannot be reached now",
    507: "Out of storage",
}
_PATH_PARAM = re.compile(r"{[^}]+}")


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route that answers these statuses too (documented as problem+json)."""
    return {status: {"description": DESCRIPTIONS.get(status, "Error")} for status in statuses}


def document_problems(app: FastAPI) -> None:
    """Rewrite `app`'s OpenAPI document so every error it can answer is documented (see module doc).

    Call it after `services.common.auth.protect`, which documents the 401/403 of guarded routes:
    this runs last, over whatever the document says by then.
    """
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _rewrite(build())
        assert app.openapi_schema is not None
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _rewrite(document: dict[str, Any]) -> None:
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    schemas["Problem"] = PROBLEM_SCHEMA
    for path, operations in document.get("paths", {}).items():
        for operation in operations.values():
            if not isinstance(operation, dict):
                continue
            statuses = {503}
            if "requestBody" in operation:
                statuses |= {400, 413, 422}
            if operation.get("parameters"):
                statuses.add(422)
            if _PATH_PARAM.search(path):
                statuses |= {404, 422}
            responses = operation.setdefault("responses", {})
            for status in statuses:
                responses.setdefault(str(status), {})
            for status, response in responses.items():
                if status.isdigit() and int(status) >= 400:
                    description = response.get("description")
                    if not description or description == "Validation Error":
                        response["description"] = DESCRIPTIONS.get(int(status), "Error")
                    response["content"] = {PROBLEM_JSON: {"schema": PROBLEM_REF}}
