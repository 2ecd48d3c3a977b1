"""Connection limits the HTTP server itself does not have: header size, header-read time, open connections.

uvicorn 0.54 with httptools (the stack every service runs on, see `server.serve`) has none of the
three. httptools buffers a header of any size (100 MB were answered 200, and ten such connections
took the router from 67 MB to 1 GB); `timeout_keep_alive` is armed only after a response, so a
client that sends one header line and then nothing holds its connection forever;
`h11_max_incomplete_event_size` exists for the h11 parser only; `limit_concurrency` answers a
plain-text 503. So each service runs this subclass of uvicorn's httptools protocol, which:

- counts the bytes of a request until its headers are complete, and past `max_header_bytes`
  answers 431 and closes the connection (the bytes held are bounded by the limit plus one read);
  headers that arrive complete within one read are measured once parsed, and get the same 431;
- arms a timer when a connection opens and when a request starts, disarmed once its headers are
  complete: a client that takes longer than `header_timeout_s` gets 408 and the connection closes;
- likewise, once the headers are in, a body that pauses longer than `body_timeout_s` gets 408 and the
  connection closes (only closes, when the service has begun to answer): bodies are bounded before tokens
  are checked, so without it anyone could hold connections up to the cap, and every other client got 503;
- serves at most `max_connections` connections at once: a request on a connection beyond gets
  503 problem+json with `Connection: close` (logged once, then once per period with a count: a
  flood of them is not a flood of log lines).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from services.common.problems import PROBLEM_JSON

log = logging.getLogger(__name__)

LINGER_S = 2.0
"""How long a refused connection's remaining input is read and dropped before it is closed (see `_linger`)."""
REFUSALS_LOGGED_EVERY_S = 10.0
"""A flood of refusals past the connection cap is one WARNING at once, then one per this many seconds."""


class RefusalLog:
    """Logs the connection cap's refusals without letting a flood of them flood the log.

    The first refusal is logged at once; those that follow within `every_s` are counted, and one line
    says how many when the period ends (and the next period starts), so a flood of N refusals is
    about one line per period, not N. A timer does it: nothing runs while nobody is refused.
    """

    def __init__(self, every_s: float = REFUSALS_LOGGED_EVERY_S) -> None:
        self.every_s = every_s
        self.unreported = 0
        self._timer: asyncio.TimerHandle | None = None

    def refused(self, loop: asyncio.AbstractEventLoop, max_connections: int) -> None:
        if self._timer is not None:
            self.unreported += 1
            return
        log.warning("over %d open connections: answering 503", max_connections)
        self._timer = loop.call_later(self.every_s, self._period_over, loop, max_connections)

    def _period_over(self, loop: asyncio.AbstractEventLoop, max_connections: int) -> None:
        self._timer = None
        if self.unreported:
            log.warning(
                "over %d open connections: answered 503 to %d more request(s) in the last %g s",
                max_connections, self.unreported, self.every_s,
            )  # fmt: skip
            self.unreported = 0
            self._timer = loop.call_later(self.every_s, self._period_over, loop, max_connections)


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    max_header_bytes: int = 64 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    max_connections: int = 1000


def _problem(status: int, title: str, detail: str) -> bytes:
    return json.dumps({"type": "about:blank", "title": title, "status": status, "detail": detail}).encode()


async def _over_capacity(scope: Any, receive: Any, send: Any) -> None:
    """The ASGI app that answers requests on connections beyond the cap (in place of the service)."""
    body = _problem(503, "Service unavailable", "too many open connections; try again shortly")
    headers = [
        (b"content-type", PROBLEM_JSON.encode()),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"1"),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _headers_too_large(max_header_bytes: int) -> Any:
    """The ASGI app that answers a request whose headers, complete, are over the limit (in place of the service)."""
    body = _problem(
        431, "Request header fields too large", f"the request line and headers exceed {max_header_bytes} bytes"
    )
    headers = [
        (b"content-type", PROBLEM_JSON.encode()),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]

    async def answer(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 431, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return answer


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with `limits` enforced; build one with `protocol_with`."""

    limits: ClassVar[ConnectionLimits] = ConnectionLimits()
    refusals: ClassVar[RefusalLog] = RefusalLog()  # one per server (`protocol_with`), shared by its connections

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limit_concurrency = None  # uvicorn's own cap answers in plain text: ours replaces it
        self._header_bytes = 0
        self._read_bytes = 0  # the size of the read being parsed
        self._reading_headers = True  # a connection opens waiting for its first request's headers
        self._header_timer: asyncio.TimerHandle | None = None
        self._reading_body = False  # from a request's headers to the end of its body
        self._body_read_at = 0.0  # when the last read of a body that is still coming ended
        self._body_timer: asyncio.TimerHandle | None = None
        self._lingering = False

    # -- the header-read timer ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        self._disarm_body_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        detail = f"the request's headers did not arrive within {self.limits.header_timeout_s:g} s"
        self._refuse(408, "Request timeout", detail)

    # -- the body-read timer: one timer per pause, not one per read ---------------------------------------

    def _disarm_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_timeout(self) -> None:
        self._body_timer = None
        if not self._reading_body or self._lingering or self.transport.is_closing():
            return
        timeout = self.limits.body_timeout_s
        idle = self.loop.time() - self._body_read_at
        if self.flow.read_paused or idle < timeout:  # paused: the service is not taking the body yet, not the client
            self._body_timer = self.loop.call_later(
                timeout if self.flow.read_paused else timeout - idle, self._body_timeout
            )
            return
        cycle = self.cycle
        if cycle is not None and cycle.response_started:
            self.transport.close()  # the service has answered, or is answering: no second answer
            return
        if cycle is not None:
            # The service hears a disconnect (what it would answer is dropped); the client hears why.
            cycle.disconnected = True
            cycle.message_event.set()
            self.cycle = None  # type: ignore[assignment]  # as uvicorn starts a connection
        self._refuse(408, "Request timeout", f"the request's body paused for more than {timeout:g} s")

    def on_message_complete(self) -> None:
        self._reading_body = False
        self._disarm_body_timer()
        super().on_message_complete()

    # -- counting header bytes ------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading_headers = True
        self._header_bytes = 0
        self._arm_header_timer()  # an idle keep-alive connection was under uvicorn's keep-alive timer

    def on_headers_complete(self) -> None:
        # The read that completes the headers is not counted in `data_received` (it may carry body bytes), so
        # headers that arrive whole in one read were never counted: 100 KB of them were served. That read's
        # size, with the reads of the request before it, bounds them; only past the limit are they measured.
        limit = self.limits.max_header_bytes
        too_large = self._header_bytes + self._read_bytes > limit and self._head_bytes() > limit
        self._reading_headers = False
        self._header_bytes = 0
        self._disarm_header_timer()
        # `self.app` is per connection: a request on a connection beyond the cap is answered by a 503 app.
        over = len(self.connections) > self.limits.max_connections
        self.app = _over_capacity if over else self.config.loaded_app
        if over:
            self.refusals.refused(self.loop, self.limits.max_connections)
        elif too_large:
            self.app = _headers_too_large(limit)
        self._reading_body = True  # until on_message_complete, in this very read for a request without a body
        super().on_headers_complete()

    def _head_bytes(self) -> int:
        """The request line's target and the headers, as sent (`name: value` and CRLF each)."""
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        self._read_bytes = len(data)
        super().data_received(data)
        if self._reading_body:  # a body still to come: the pause starts now
            self._body_read_at = self.loop.time()
            if self._body_timer is None:
                self._body_timer = self.loop.call_later(self.limits.body_timeout_s, self._body_timeout)
        # Counted after parsing: a read that completes the headers may carry body bytes, which do not count.
        # A read that ends still inside the headers is all header bytes (bar a pipelined predecessor's tail).
        if self._reading_headers and not self.transport.is_closing():
            self._header_bytes += len(data)
            if self._header_bytes > self.limits.max_header_bytes:
                detail = f"the request line and headers exceed {self.limits.max_header_bytes} bytes"
                self._refuse(431, "Request header fields too large", detail)

    # -- answering and closing ------------------------------------------------------------------------

    def _refuse(self, status: int, title: str, detail: str) -> None:
        """Answer `status` and close, unless a response is under way on this connection (then just close)."""
        if self.transport.is_closing() or self._lingering:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()
            return
        body = _problem(status, title, detail)
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: ", PROBLEM_JSON.encode(), b"\r\n",
            b"content-length: ", str(len(body)).encode(), b"\r\n",
            b"connection: close\r\n\r\n",
        ]  # fmt: skip
        self.transport.write(b"".join(head) + body)
        self._linger()

    def _linger(self) -> None:
        """Close without losing the answer: closing a socket with unread bytes in it sends a reset, and the
        client's TCP stack drops what it had not read yet (our answer with it). So, as nginx does, stop
        sending (FIN), read and drop what still comes for a moment, then close."""
        self._lingering = True
        self._disarm_header_timer()
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self.flow.resume_reading()
        self.loop.call_later(LINGER_S, self.transport.close)

    def eof_received(self) -> None:
        if self._lingering:
            self.transport.close()


def protocol_with(limits: ConnectionLimits) -> type[LimitedHttpToolsProtocol]:
    """The protocol class to hand uvicorn (`uvicorn.Config(http=...)`), enforcing `limits`."""
    return type("LimitedHttpToolsProtocol", (LimitedHttpToolsProtocol,), {"limits": limits, "refusals": RefusalLog()})
