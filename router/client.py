"""The async client SDK for CatTube's event router: publish, subscribe, consume a queue, watch stats.

Every CatTube service talks to the router through this module and nothing else:

    async with RouterClient("http://127.0.0.1:8700", token=token) as router:
        await router.ensure_subscription("transcode", pattern={"type": ["cattube.video.uploaded"]},
                                         target={"queue": {}}, delivery={"max_receive_count": 3})
        await router.publish(new_event("cattube.video.uploaded", "cattube/upload", {"video_id": "v1"},
                                       id="v1", partitionkey="v1"))
        queue = router.queue("transcode")
        for message in await queue.receive(wait_s=20):
            ...
            await queue.ack([message.receipt])

A consumer of many messages keeps a window of them in flight instead, with acks batched:

        async with queue.stream(prefetch=100) as messages:
            async for message in messages:
                ...
                messages.ack(message)

Publishes made at the same time share requests: one request is out at a time, carrying every event
queued while the previous one was out (router/client_publish.py); one publish at a time goes alone at once.
Publishing retries connection errors and 5xx answers with exponential backoff and full jitter.
That is safe because an event's `source`+`id` are fixed before the first try: the router keeps
the first copy and answers repeats with `duplicate: true`.

Given several routers (replicas over one PostgreSQL), the client sticks with one and moves on to the
next, in order and coming back around, when one cannot be reached or answers 503:

    RouterClient(["http://r1:8700", "http://r2:8700"], token=token)
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import httpx
from fastapi import HTTPException, Request
from httpx_aiohttp import AiohttpTransport
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from router.client_publish import PublishCoalescer
from router.client_queues import Acker, MessageStream, QueueConsumer
from router.client_values import (
    RETRYABLE_STATUS,
    PublishResult,
    QueueStats,
    ReceivedMessage,
    RouterError,
    RouterUnavailable,
    full_jitter,
    json_body,
    new_event,
    parse_url,
    problem_of,
    unreachable_problem,
)

__all__ = [
    "Acker",
    "MessageStream",
    "PublishResult",
    "PushReceiver",
    "QueueConsumer",
    "QueueStats",
    "ReceivedMessage",
    "RouterClient",
    "RouterError",
    "RouterUnavailable",
    "full_jitter",
    "new_event",
]

log = logging.getLogger(__name__)


class RouterClient:
    """A connection pool to a router, or to several replicas of one. Use as an async context manager, or
    call `aclose()`.

    `base_url` is one URL, or a list of replicas: requests go to one of them until it fails to
    connect or answers 503, then to the next in order (coming back around), within the same call
    and before any backoff. Replicas are interchangeable (publishing is idempotent on source+id,
    a receipt from one acks on another), so what failed on one is simply sent again on the next.

    Requests are httpx requests, sent by an httpx transport: by default `httpx-aiohttp`'s, over
    aiohttp's connection pool (httpx's own pool costs several times aiohttp's CPU per request, see
    bench/README.md, HTTP clients). `transport` replaces it: `httpx.AsyncHTTPTransport()` for httpx's
    own, `httpx.ASGITransport(app)` for an in-process router in tests. Requests go straight to the
    transport (no cookies, redirects or auth flows to run), and to the router directly: proxy
    variables in the environment are not consulted.

    `coalesce_publishes` (on by default): concurrent `publish` calls share requests (router.client_publish);
    off, every call is a request of its own.
    """

    def __init__(
        self,
        base_url: str | Sequence[str],
        *,
        token: str | None = None,
        timeout_s: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
        retries: int = 8,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 5.0,
        max_connections: int = 100,
        coalesce_publishes: bool = True,
    ) -> None:
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not urls:
            raise ValueError("base_url: expected at least one router URL")
        self.base_urls = tuple(url.rstrip("/") for url in urls)
        # The replica requests go to: moved on only when it fails, so connections are reused.
        self._current = 0
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # Long polls wait up to 20 s on the server: the read timeout leaves room for that. One pool for
        # every replica: connections are kept per origin.
        # `max_connections` bounds the default pool; requests beyond it wait their turn for a connection.
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._transport = transport or AiohttpTransport(limits=limits)
        timeout = httpx.Timeout(timeout_s)
        self._http = httpx.AsyncClient(headers=headers, timeout=timeout, transport=self._transport, trust_env=False)
        # What the client would add to every request, worked out once: its default headers with the token.
        self._headers = {name.lower(): value for name, value in self._http.headers.items()}
        self._extensions = {"timeout": timeout.as_dict()}
        self.retries = retries
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._publisher = PublishCoalescer(self._publish_encoded) if coalesce_publishes else None

    @property
    def base_url(self) -> str:
        """The router requests go to now (one of `base_urls`)."""
        return self.base_urls[self._current]

    async def __aenter__(self) -> RouterClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._publisher is not None:
            await self._publisher.aclose()
        await self._http.aclose()

    # -- plumbing ---------------------------------------------------------------------------------

    async def _request(self, method: str, path: str, *, retry: bool = False, **kwargs: Any) -> httpx.Response:
        attempt = 0
        while True:
            try:
                return await self._send(method, path, kwargs)
            except RouterUnavailable as exc:
                attempt += 1
                if not retry or attempt > self.retries:
                    raise
                delay = full_jitter(attempt, self.backoff_initial_s, self.backoff_max_s)
                log.debug("router %s %s failed (%s); retrying in %.2fs", method, path, exc.problem.get("detail"), delay)
            await asyncio.sleep(delay)

    async def _send(self, method: str, path: str, kwargs: dict[str, Any]) -> httpx.Response:
        """One try on each router, from the current one on, until one answers other than 503.

        Raises `RouterError` for a refusal, `RouterUnavailable` for a retryable failure (the last one's).
        """
        start = self._current
        count = len(self.base_urls)
        for step in range(count):
            index = (start + step) % count
            try:
                response = await self._exchange(method, self.base_urls[index] + path, **kwargs)
            except httpx.TransportError as exc:
                problem, status = unreachable_problem(exc), 503
            else:
                if response.status_code < 400:
                    self._current = index
                    return response
                problem = problem_of(response)
                status = response.status_code
                if status not in RETRYABLE_STATUS:
                    raise RouterError(status, problem)
                if status != 503:  # this router is there but failed the request: retry it there
                    break
            if count > 1:
                self._move_on(index)
                log.warning(
                    "router %s failed %s %s (%s); moving on to %s",
                    self.base_urls[index],
                    method,
                    path,
                    problem.get("detail") or problem.get("title"),
                    self.base_urls[(index + 1) % count],
                )
        raise RouterUnavailable(status, problem)

    def _move_on(self, index: int) -> None:
        """Send requests to the next replica after the one at `index` failed. Concurrent requests may all
        see it fail: only the first moves everyone on."""
        if len(self.base_urls) > 1 and self._current == index:
            self._current = (index + 1) % len(self.base_urls)

    async def _exchange(
        self,
        method: str,
        url: str,
        *,
        json: Any = None,
        content: bytes | None = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """One request through the transport, its body read. `AsyncClient.request` would do the same
        plus cookies, auth and redirect flows, none of which a router needs, at ~1.5x the CPU."""
        fields = self._headers
        if json is not None or headers:
            fields = dict(fields)
            if json is not None:
                # As httpx's `json=` writes it (NaN refused, as before).
                content = _json_dumps(json, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
                fields["content-type"] = "application/json"
            for name, value in (headers or {}).items():
                fields[name.lower()] = value
        request = httpx.Request(
            method, parse_url(url), params=params, headers=fields, content=content, extensions=self._extensions
        )
        streamed = await self._transport.handle_async_request(request)
        # The transport's byte stream read directly: `Response.aread` stacks four async generators on it.
        stream = streamed.stream
        assert isinstance(stream, httpx.AsyncByteStream)
        try:
            body = b"".join([chunk async for chunk in stream])
        finally:
            await stream.aclose()
        return httpx.Response(
            streamed.status_code,
            headers=streamed.headers,
            content=body,
            request=request,
            extensions=streamed.extensions,
        )

    # -- publishing -------------------------------------------------------------------------------

    async def publish(self, event: Mapping[str, Any]) -> PublishResult:
        """Publish one CloudEvent (see `new_event`); returns once the router has made it durable.

        Concurrent calls share requests (see the class); each gets its own result or its own error."""
        if self._publisher is None:
            (result,) = await self.publish_batch([event])
            return result
        # Encoded here, as httpx's `json=` would (NaN refused): an event that cannot be sent fails alone, at once.
        encoded = _json_dumps(event, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
        r = await self._publisher.publish(encoded)
        return PublishResult(r["id"], r["sequence"], r["duplicate"])

    async def _publish_encoded(self, batch: bytes) -> list[dict[str, Any]]:
        """POST a JSON array of encoded events (the coalescer's); the router's results, in order."""
        response = await self._request("POST", "/events", retry=True, content=batch, headers=BATCH_HEADERS)
        results: list[dict[str, Any]] = json_body(response)["results"]
        return results

    async def publish_batch(self, events: Sequence[Mapping[str, Any]]) -> list[PublishResult]:
        """Publish events atomically in one request (all or none); results in the same order."""
        response = await self._request(
            "POST",
            "/events",
            retry=True,
            json=list(events),
            headers=BATCH_HEADERS,
        )
        return [PublishResult(r["id"], r["sequence"], r["duplicate"]) for r in json_body(response)["results"]]

    # -- subscriptions ----------------------------------------------------------------------------

    async def ensure_subscription(
        self,
        name: str,
        *,
        pattern: Mapping[str, Any] | None,
        target: Mapping[str, Any],
        delivery: Mapping[str, Any] | None = None,
        start: str | int = "latest",
        wait_for_router: bool = False,
    ) -> dict[str, Any]:
        """Create or update a subscription (PUT is idempotent) and return it.

        With `wait_for_router`, keeps retrying (with backoff) until the router answers: what a service
        does at start-up, so it can start before the router does.
        """
        body = {"pattern": pattern, "target": target, "delivery": dict(delivery or {}), "start": start}
        attempt = 0
        while True:
            try:
                response = await self._request("PUT", f"/subscriptions/{name}", retry=True, json=body)
                result: dict[str, Any] = response.json()
                return result
            except RouterUnavailable:
                if not wait_for_router:
                    raise
                attempt += 1
                delay = full_jitter(attempt, self.backoff_initial_s, self.backoff_max_s)
                log.warning("router not reachable to declare subscription %r; retrying in %.1fs", name, delay)
                await asyncio.sleep(delay)

    async def get_subscription(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = (await self._request("GET", f"/subscriptions/{name}")).json()
        return result

    async def delete_subscription(self, name: str) -> None:
        await self._request("DELETE", f"/subscriptions/{name}")

    def queue(self, name: str) -> QueueConsumer:
        """The consumer side of a queue subscription."""
        return QueueConsumer(self, name)

    async def stats(self, name: str, *, wait_s: float = 0, version: int | None = None) -> QueueStats:
        """A subscription's numbers; with `version`, waits up to `wait_s` for them to change first."""
        params: dict[str, Any] = {"wait_s": wait_s}
        if version is not None:
            params["version"] = version
        data = (await self._request("GET", f"/subscriptions/{name}/stats", params=params)).json()
        return QueueStats(**{field: data[field] for field in QueueStats.__dataclass_fields__})

    async def watch_stats(self, name: str, *, wait_s: float = 20) -> AsyncIterator[QueueStats]:
        """Yield the subscription's numbers now and then every time they change (long polls, no polling).

        Connection errors are retried with backoff; the iterator ends only when the caller stops it.
        """
        version: int | None = None
        failures = 0
        while True:
            try:
                stats = await self.stats(name, wait_s=wait_s if version is not None else 0, version=version)
            except RouterUnavailable as exc:
                failures += 1
                delay = full_jitter(failures, self.backoff_initial_s, self.backoff_max_s)
                log.warning("stats of %r unavailable (%s); retrying in %.1fs", name, exc, delay)
                await asyncio.sleep(delay)
                continue
            failures = 0
            if stats.version != version:
                version = stats.version
                yield stats


_json_dumps = json.dumps  # `_exchange` has a parameter named `json`
BATCH_HEADERS = {"Content-Type": "application/cloudevents-batch+json"}


class PushReceiver:
    """A FastAPI dependency for push consumers: verifies the router's signature and returns the CloudEvent.

    Refuses unsigned, forged and stale (older than 5 minutes) deliveries with 401, per Standard
    Webhooks. The secret comes back from `ensure_subscription` on a push target, so it can be set
    after the app is built:

        receiver = PushReceiver()

        @app.post("/events", status_code=204)
        async def on_event(event: Annotated[dict[str, Any], Depends(receiver)]) -> None:
            ...

        sub = await router.ensure_subscription("store", pattern=..., target={"url": my_url + "/events"})
        receiver.secret = sub["secret"]
    """

    def __init__(self, secret: str | None = None) -> None:
        self.secret = secret

    async def __call__(self, request: Request) -> dict[str, Any]:
        if not self.secret:
            raise HTTPException(503, "not subscribed yet: no signing secret to verify deliveries with")
        body = await request.body()
        headers = dict(request.headers)
        try:
            Webhook(self.secret).verify(body, headers, json_parse=False)
        except (WebhookVerificationError, UnicodeDecodeError, ValueError) as exc:
            raise HTTPException(
                401, f"webhook-signature: expected a valid, fresh Standard Webhooks signature ({exc})"
            ) from None
        return _cloudevent(body, headers)


def _cloudevent(body: bytes, headers: Mapping[str, str]) -> dict[str, Any]:
    """The CloudEvent of a delivery, in structured mode (the body) or binary mode (ce-* headers + data)."""
    content_type = headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "application/cloudevents+json":
        event: dict[str, Any] = json.loads(body)
        return event
    event = {name[3:]: value for name, value in headers.items() if name.lower().startswith("ce-")}
    if content_type:
        event["datacontenttype"] = content_type
    if body:
        event["data"] = json.loads(body) if media == "application/json" or media.endswith("+json") else body.decode()
    return event
