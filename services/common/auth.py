"""Bearer-token authentication as a pure ASGI middleware (cheap on the hot publish path)."""

from __future__ import annotations

import hmac
import json

from starlette.types import ASGIApp, Receive, Scope, Send

from services.common.problems import PROBLEM_JSON

# Always open: liveness, readiness and the API docs (DESIGN.md, Router: Auth).
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
DOCS_ASSETS = "/static-offline-docs/"
"""Swagger UI's and ReDoc's scripts, served by each service itself (fastapi-offline): open like /docs."""


class BearerAuthMiddleware:
    """Refuse requests without `Authorization: Bearer <token>` (constant-time comparison) with 401."""

    def __init__(self, app: ASGIApp, token: str, open_paths: frozenset[str] = OPEN_PATHS) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] in self.open_paths
            or scope["path"].startswith(DOCS_ASSETS)
            or self._authorized(scope)
        ):
            await self.app(scope, receive, send)
            return
        body = json.dumps(
            {
                "type": "about:blank",
                "title": "Unauthorized",
                "status": 401,
                "detail": "Authorization: expected 'Bearer <token>' with the token set in CATTUBE_TOKEN",
                "errors": [{"field": "header.Authorization", "expected": "Bearer <CATTUBE_TOKEN>"}],
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", PROBLEM_JSON.encode()),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                return hmac.compare_digest(value, self.expected)
        return False
