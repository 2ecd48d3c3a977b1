"""Scoped bearer tokens: one declarative access table per service, checked by a pure ASGI middleware.

Three tokens, three scopes, each wider than the one before (docs/architecture.md, Tokens and scopes):

    user     upload, list, edit, retry, delete videos   CATTUBE_USER_TOKEN     (what the page holds)
    service  publish, receive/ack, own subscriptions    CATTUBE_SERVICE_TOKEN  (what services call with)
    admin    everything: router management, autoscaler  CATTUBE_TOKEN

A service declares the scope of every route in one table; a request the table does not name needs
admin, so a forgotten route fails closed:

    ACCESS = AccessRules([
        ("POST", "/events", Access.SERVICE),
        ("GET", "/subscriptions/{name}/stats", Access.SERVICE),
    ])
    app.add_middleware(ScopedAuthMiddleware, rules=ACCESS, tokens=Tokens.from_settings(settings))

A missing or unknown token is answered 401; a known token without the scope a route needs, 403
naming that scope. The middleware is pure ASGI (cheap on the hot publish path) and also guards plain
Starlette routes that FastAPI's dependencies would never see. With no token set, everything is open.
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from fastapi import FastAPI
from starlette.routing import compile_path
from starlette.types import ASGIApp, Receive, Scope, Send

from services.common.problems import PROBLEM_JSON
from services.common.settings import CommonSettings


class Access(IntEnum):
    """What a route needs; a token of a higher scope may do everything a lower one may."""

    PUBLIC = 0
    USER = 1
    SERVICE = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()


# Which variable holds the token of each scope: named in 401/403 answers and in /docs.
VARIABLES = {Access.USER: "CATTUBE_USER_TOKEN", Access.SERVICE: "CATTUBE_SERVICE_TOKEN", Access.ADMIN: "CATTUBE_TOKEN"}

GRANTED = "cattube.access"
"""The ASGI scope key where the middleware leaves the granted scope for the routes."""

# Every service serves these (services/common/ops.py and FastAPI's docs): liveness, readiness and the
# API docs stay open; metrics are for monitoring, which runs with the service token.
OPERATIONS: list[tuple[str, str, Access]] = [
    ("GET HEAD", "/healthz", Access.PUBLIC),
    ("GET HEAD", "/readyz", Access.PUBLIC),
    ("GET HEAD", "/docs", Access.PUBLIC),
    ("GET HEAD", "/docs/oauth2-redirect", Access.PUBLIC),
    ("GET HEAD", "/redoc", Access.PUBLIC),
    ("GET HEAD", "/openapi.json", Access.PUBLIC),
    # Swagger UI's and ReDoc's scripts, served by each service itself (fastapi-offline).
    ("GET HEAD", "/static-offline-docs/{asset:path}", Access.PUBLIC),
    ("GET", "/metrics", Access.SERVICE),
]


@dataclass(frozen=True)
class Tokens:
    """The token of each scope a service knows (bytes, compared in constant time); none = auth off."""

    by_scope: dict[Access, bytes]

    @classmethod
    def from_settings(cls, settings: CommonSettings) -> Tokens:
        given = {
            Access.ADMIN: settings.token_value,
            Access.SERVICE: settings.service_token_value,
            Access.USER: settings.user_token_value,
        }
        return cls({scope: token.encode() for scope, token in given.items() if token})

    @property
    def enabled(self) -> bool:
        return bool(self.by_scope)

    def scope_of(self, token: bytes) -> Access | None:
        """The scope of a token, or None; every known token is compared, so timing tells nothing."""
        found = None
        for scope, expected in self.by_scope.items():
            if hmac.compare_digest(token, expected):
                found = scope
        return found


class AccessRules:
    """(methods, path template, scope) rows, the template in Starlette's syntax (`/videos/{id}`)."""

    def __init__(self, rows: Iterable[tuple[str, str, Access]], *, default: Access = Access.ADMIN) -> None:
        self.default = default
        self.rows: list[tuple[frozenset[str], str, re.Pattern[str], Access]] = []
        # The service's own rows first: the hot routes (publish, receive, ack) are matched soonest.
        for methods, template, scope in [*rows, *OPERATIONS]:
            pattern, _, _ = compile_path(template)
            verbs = set(methods.split())
            if "GET" in verbs:
                verbs.add("HEAD")  # Starlette answers HEAD wherever it answers GET
            self.rows.append((frozenset(verbs), template, pattern, scope))

    def needed(self, method: str, path: str) -> Access:
        for methods, _, pattern, scope in self.rows:
            if method in methods and pattern.match(path):
                return scope
        return self.default

    def of_template(self, method: str, template: str) -> Access:
        """The scope of a route as the OpenAPI document names it (its path template)."""
        for methods, row_template, _, scope in self.rows:
            if method in methods and row_template == template:
                return scope
        return self.default


class ScopedAuthMiddleware:
    """Let a request through when its bearer token's scope covers what the access table asks for."""

    def __init__(self, app: ASGIApp, rules: AccessRules, tokens: Tokens) -> None:
        self.app = app
        self.rules = rules
        self.tokens = tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.tokens.enabled:
            await self.app(scope, receive, send)
            return
        if await admit(self.tokens, self.rules.needed(scope["method"], scope["path"]), scope, send):
            await self.app(scope, receive, send)


async def admit(tokens: Tokens, needed: Access, scope: Scope, send: Send) -> bool:
    """True when the request's token covers `needed` (its scope is then left in `scope`), else answer 401
    or 403 and return False: the middleware's check, also called by the router's front door for its hot
    routes (router/front.py), so both answer alike. With no token set (`tokens.enabled` false) call neither."""
    given = _bearer(scope)
    granted = None if given is None else tokens.scope_of(given)
    if needed is Access.PUBLIC:
        # Open to anyone; a valid token still counts (the store shows its holder more).
        if granted is not None:
            scope[GRANTED] = granted
        return True
    if granted is None:
        await _refuse(send, 401, needed, "missing or unknown bearer token", b"Bearer")
        return False
    if granted < needed:
        challenge = f'Bearer error="insufficient_scope", scope="{needed.label}"'.encode()
        await _refuse(send, 403, needed, f"the token given has the {granted.label} scope", challenge)
        return False
    scope[GRANTED] = granted
    return True


def granted_access(scope: Scope) -> Access | None:
    """The scope of the request's valid token once the middleware let it through; None with auth off,
    or on an open route asked without a valid token."""
    granted: Access | None = scope.get(GRANTED)
    return granted


def _bearer(scope: Scope) -> bytes | None:
    """The credentials of `Authorization: Bearer <token>`; the scheme is case-insensitive (RFC 9110 11.1)."""
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    for name, value in headers:
        if name == b"authorization":
            scheme, _, credentials = value.strip().partition(b" ")
            if scheme.lower() != b"bearer":
                return None
            return credentials.strip(b" ")
    return None


async def _refuse(send: Send, status: int, needed: Access, why: str, challenge: bytes) -> None:
    variable = VARIABLES[needed]
    body = json.dumps(
        {
            "type": "about:blank",
            "title": "Unauthorized" if status == 401 else "Forbidden",
            "status": status,
            "detail": f"This needs a token with the {needed.label} scope ({variable} or a wider one): {why}.",
            "errors": [{"field": "header.Authorization", "expected": f"Bearer <{variable}>"}],
            "scope": needed.label,
        }
    ).encode()
    headers = [
        (b"content-type", PROBLEM_JSON.encode()),
        (b"content-length", str(len(body)).encode()),
        (b"www-authenticate", challenge),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def protect(app: FastAPI, rules: AccessRules, settings: CommonSettings) -> None:
    """Guard `app` with its access table, and say in its OpenAPI document what each operation needs."""
    tokens = Tokens.from_settings(settings)
    app.add_middleware(ScopedAuthMiddleware, rules=rules, tokens=tokens)
    if not tokens.enabled:
        return  # nothing is asked for: the document must not claim otherwise
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _document(build(), rules)
        assert app.openapi_schema is not None
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _document(schema: dict[str, Any], rules: AccessRules) -> None:
    schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
    for scope in (Access.USER, Access.SERVICE, Access.ADMIN):
        schemes[scope.label] = {
            "type": "http",
            "scheme": "bearer",
            "description": f"{VARIABLES[scope]}: the {scope.label} scope (a wider token is accepted too).",
        }
    problem = {PROBLEM_JSON: {"schema": {"type": "object"}}}
    for template, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            needed = rules.of_template(method.upper(), template)
            if needed is Access.PUBLIC:
                continue
            operation["security"] = [{s.label: []} for s in Access if s >= needed and s is not Access.PUBLIC]
            operation.setdefault("responses", {}).setdefault(
                "401", {"description": "Missing or unknown bearer token.", "content": problem}
            )
            operation["responses"].setdefault(
                "403", {"description": f"The token lacks the {needed.label} scope.", "content": problem}
            )
