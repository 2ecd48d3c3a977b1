"""RFC 9457 problem details for every error a CatTube service answers with."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from services.common.errors import CatTubeError

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


def problem_response(
    status: int,
    title: str,
    detail: str,
    *,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    if errors:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    # FastAPI locations start with where the value came from ("body", "query", ...); keep it, it helps.
    # pydantic adds the validator or union member it tried (`function-after[...]`, `literal['a']`,
    # `constrained-int`): those name our code, not the client's field.
    return ".".join(str(part) for part in loc if not _VALIDATOR_STEP.search(str(part)))


_VALIDATOR_STEP = re.compile(r"[\[(]|^constrained-|^function-|^(int|str|float|bool|datetime)$")


def validation_problem(exc: RequestValidationError) -> JSONResponse:
    raw = exc.errors()
    errors = [{"field": _field_path(e.get("loc", ())), "expected": e.get("msg", "a valid value")} for e in raw]
    detail = "; ".join(f"{e['field']}: {e['expected']}" for e in errors) or "invalid request"
    # A body that is not JSON at all cannot be read: 400 (RFC 9110 15.5.1). 422 is for JSON that
    # parses but holds values we cannot use (15.5.21).
    if any(e.get("type") == "json_invalid" for e in raw):
        return problem_response(400, "Bad request", detail, errors=errors)
    return problem_response(422, "Invalid input", detail, errors=errors)


def allowed_methods(request: Request) -> str:
    """Every method some route serves at this path. Starlette's 405 names only the first route whose
    path matched, so `OPTIONS /subscriptions/x` said `Allow: PUT` while GET and DELETE work too."""
    methods: set[str] = set()
    scope = {**request.scope, "method": "GET"}
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.matches(scope)[0] != Match.NONE and route.methods:
            methods |= route.methods
    return ", ".join(sorted(methods))


def install_problem_handlers(app: FastAPI) -> None:
    """Answer every error, ours and FastAPI's, as `application/problem+json`."""

    async def on_cattube_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, CatTubeError)
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return problem_response(exc.status, exc.title, exc.detail, errors=exc.errors, headers=headers)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return validation_problem(exc)

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        title = {404: "Not found", 405: "Method not allowed"}.get(exc.status_code, "HTTP error")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = allowed_methods(request)
        return problem_response(exc.status_code, title, detail, headers=headers)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(500, "Internal error", "an unexpected error occurred; see the service log")

    app.add_exception_handler(CatTubeError, on_cattube_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
