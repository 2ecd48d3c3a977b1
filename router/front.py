"""The router's front door: its hot routes served before FastAPI's middleware stack.

A request to a FastAPI app passes about ten layers before its route is matched (Starlette's error and
exception middleware, FastAPI's telemetry and body-limit wrappers, our body limit and scoped auth,
FastAPI's exit stack, the router's matching over every route), and each event costs two requests:
its publish and its ack (bench/README.md). So `RouterApp.__call__`, the app uvicorn calls, recognises
the hot requests by method and a split of the path, and serves them itself with the same checks done
inline, in the order the stack does them:

- `POST /events`: the token check (`auth.admit`), then the route, which bounds its own body;
- `POST /subscriptions/{name}/ack|nack|extend|stream`: the body bound of `BodyLimitMiddleware`
  (`body_limit.read_within`, 413), then the token check, then the route;
- errors as the stack answers them (`Front.failed`): the app's own problem handlers, `CatTubeError`s as
  `ExceptionMiddleware` does, anything else as `ServerErrorMiddleware` does (logged, 500, re-raised, so
  uvicorn logs it and closes the connection).

Connection caps and header limits belong to the server's protocol (services/common/connections.py), so
they hold for every request before any app runs; the router's metrics are recorded by the routes
themselves. Every other request goes to FastAPI unchanged, as do the ack bodies the plain route does not
take (so their refusals stay FastAPI's own), and requests under a `root_path`, which the stack's
routing would strip.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, cast

from fastapi import FastAPI
from starlette._utils import is_async_callable
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from router import stream_api
from router.api import ACCESS, ensure_owner
from router.hot_routes import PublishRoute, ReceiptsRoute
from router.settings import RouterSettings
from services.common.auth import AccessRules, Tokens, admit
from services.common.body_limit import read_within

Endpoint = Callable[[Scope, Receive, Send], Awaitable[None]]
Handler = Callable[[Request, Exception], Any]

HANDED_OVER = "cattube.front.handed_over"
"""Set in the scope of a request the front passed on to the stack: the stack has answered its errors."""


class Hot:
    """One hot route: its endpoint, the scope its access rule asks, and its body bound (None: its own)."""

    __slots__ = ("endpoint", "needed", "max_body_bytes")

    def __init__(self, endpoint: Endpoint, rules: AccessRules, template: str, max_body_bytes: int | None) -> None:
        self.endpoint = endpoint
        # The rule's first match for the template itself: `{name}` matches the `[^/]+` of every name alike.
        self.needed = rules.needed("POST", template)
        self.max_body_bytes = max_body_bytes


class Front:
    """The hot routes of one app, and how the stack would answer their errors."""

    def __init__(self, app: RouterApp, settings: RouterSettings, rules: AccessRules = ACCESS) -> None:
        tokens = Tokens.from_settings(settings)
        self.tokens = tokens if tokens.enabled else None
        self.publish = Hot(PublishRoute(), rules, "/events", None)
        self.by_verb = {
            verb: Hot(
                ReceiptsRoute(verb, ensure_owner, app.handed_to_stack),
                rules,
                f"/subscriptions/{{name}}/{verb}",
                settings.max_body_bytes,
            )
            for verb in ("ack", "nack", "extend")
        }
        self.by_verb["stream"] = Hot(_stream, rules, "/subscriptions/{name}/stream", settings.max_body_bytes)
        self.handlers: dict[type[Exception], Handler] = {}
        self.status_handlers: dict[int, Handler] = {}
        self.server_error: Handler | None = None
        # Split as FastAPI's build_middleware_stack splits them between its two error middlewares.
        for key, handler in app.exception_handlers.items():
            if key in (500, Exception):
                self.server_error = handler
            elif isinstance(key, int):
                self.status_handlers[key] = handler
            else:
                self.handlers[key] = handler

    def match(self, scope: Scope) -> Hot | None:
        """The hot route of a POST, by its path alone (no pattern is tried); its `name` put in the scope."""
        path: str = scope["path"]
        if path == "/events":
            return self.publish
        parts = path.split("/")
        if len(parts) != 4 or parts[1] != "subscriptions" or not parts[2]:
            return None
        hot = self.by_verb.get(parts[3])
        if hot is not None:
            scope["path_params"] = {"name": parts[2]}
        return hot

    async def serve(self, hot: Hot, app: FastAPI, scope: Scope, receive: Receive, send: Send) -> None:
        scope["app"] = app
        if hot.max_body_bytes is not None:
            bounded = await read_within(hot.max_body_bytes, scope, receive, send)
            if bounded is None:
                return
            receive = bounded
        if self.tokens is not None and not await admit(self.tokens, hot.needed, scope, send):
            return
        started = False

        async def sending(message: Any) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await hot.endpoint(scope, receive, sending)
        except ClientDisconnect:
            return  # the client left before its body arrived: nobody to answer, nothing went wrong here
        except Exception as exc:
            await self.failed(exc, started, scope, receive, send)

    async def failed(self, exc: Exception, started: bool, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer `exc` as ExceptionMiddleware, then ServerErrorMiddleware, would have (in an `except` block)."""
        if scope.get(HANDED_OVER):
            raise exc  # the stack answered it already
        handler = self.status_handlers.get(exc.status_code) if isinstance(exc, HTTPException) else None
        if handler is None:
            handler = next((self.handlers[c] for c in type(exc).__mro__ if c in self.handlers), None)
        if handler is not None:
            if not started:
                response = await _call(handler, Request(scope, receive, send), exc)
                await response(scope, receive, send)
                exc.__traceback__ = None  # as Starlette: a reused exception would pile up tracebacks
                return
            exc = RuntimeError("Caught handled exception, but response already started.")
        if self.server_error is not None:  # the router installs one (services/common/problems.py)
            response = await _call(self.server_error, Request(scope), exc)
            if not started:
                await response(scope, receive, send)
        raise exc


async def _call(handler: Handler, request: Request, exc: Exception) -> Response:
    if is_async_callable(handler):
        response: Response = await handler(request, exc)
    else:
        response = await run_in_threadpool(handler, request, exc)
    return response


async def _stream(scope: Scope, receive: Receive, send: Send) -> None:
    """The stream's endpoint as Starlette's `request_response` runs it (it is no per-event route: one per stream)."""
    response = await stream_api.stream(Request(scope, receive, send))
    await response(scope, receive, send)


class RouterApp(FastAPI):
    """The router's FastAPI app with the front door: `front` serves the hot routes, FastAPI all the rest."""

    front: Front | None = None
    """None: every request goes through the stack (tests compare the two)."""
    stack: ASGIApp | None = None
    """What the front hands every other request to: FastAPI itself (None), or FastAPI behind uvicorn's proxy
    headers middleware (`serve_proxy_headers`)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        front = self.front
        if front is not None and scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            hot = front.match(scope)
            if hot is not None:
                await front.serve(hot, self, scope, receive, send)
                return
        if self.stack is None:
            await super().__call__(scope, receive, send)
        else:
            await self.stack(scope, receive, send)

    async def handed_to_stack(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The request through the whole stack, which answers its errors itself."""
        scope[HANDED_OVER] = True
        if self.stack is None:
            await super().__call__(scope, receive, send)
        else:
            await self.stack(scope, receive, send)

    def serve_proxy_headers(self, trusted_hosts: list[str] | str) -> bool:
        """Apply uvicorn's proxy headers middleware (`X-Forwarded-For` and `-Proto` from `trusted_hosts` set the
        scope's client and scheme) to the requests that reach the stack, so the server can leave it out
        (services/common/server.py): the hot routes read neither, and skip its cost (~2 µs a request)."""
        # uvicorn types ASGI apps with its own TypedDicts, Starlette with plain mappings: the same calls.
        self.stack = cast(ASGIApp, ProxyHeadersMiddleware(cast(Any, super().__call__), trusted_hosts=trusted_hosts))
        return True


def open_front_door(app: FastAPI, settings: RouterSettings) -> RouterApp:
    """`app` (built by fastapi_offline, which makes its FastAPI itself) as a `RouterApp` with its front door:
    the class adds a method and no state, so the instance keeps everything it has."""
    app.__class__ = RouterApp
    assert isinstance(app, RouterApp)
    app.front = Front(app, settings)
    return app
