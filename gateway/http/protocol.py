"""The gateway's HTTP/1.1 server protocol, run by uvicorn (`uvicorn.Config(http=protocol_class(...))`).

uvicorn still owns the process: sockets, signals, the lifespan, graceful shutdown. This replaces its
per-connection protocol, which bench/overhead.py measured at about a quarter of the gateway's CPU per proxied
request: a general ASGI server validates every response header with two regexes, arms and cancels a keep-alive
timer per request, builds an asyncio.Event per request, and sends every request of the gateway through the
Starlette app. Here:

- requests are parsed by httptools, as in uvicorn, into a standard ASGI scope;
- a POST to a proxied route goes straight to its endpoint (`GatewayApp.fast_routes`); everything else to the
  app, so any ASGI app runs under this protocol;
- each connection has one timer (deadline.py) for whichever limit applies: a complete request head within
  `header_timeout` of connecting or of its first byte (slow clients cannot hold connections open; nginx's
  client_header_timeout), and `timeout_keep_alive` of idleness between requests;
- a request head larger than twice the gateway's header limits is refused while it is parsed (431), so that
  memory stays bounded; the gatekeeper answers the exact limits of proxied requests;
- pipelined requests are answered in order; a client that leaves cancels nothing itself, but the cycle tells
  whoever asked (the cycle in `scope["extensions"][cycle.CYCLE]`), and `receive()` returns http.disconnect.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from collections import deque
from collections.abc import Mapping
from typing import Any, cast

import httptools
from starlette.types import ASGIApp, Scope
from uvicorn.config import Config
from uvicorn.server import ServerState

from gateway.errors import error_body
from gateway.http.cycle import BODY_RECEIVED, CYCLE, STATUS_LINES, Cycle
from gateway.http.deadline import Deadline

LOGGER = logging.getLogger("switchyard.http")
_ASGI = {"version": "3.0", "spec_version": "2.3"}

# What the connection is waiting for, and so which of its deadlines applies.
_HEAD = 0  # a request head (since the connection opened, or since the first byte of the next request)
_BUSY = 1  # a request is being answered: the app's own limits apply
_IDLE = 2  # the next request on a kept-alive connection


class _Limits:
    """One server's limits on request heads."""

    __slots__ = ("header_timeout", "max_head_bytes", "max_headers")

    def __init__(self, header_timeout: float, max_header_count: int, max_header_bytes: int) -> None:
        self.header_timeout = header_timeout
        self.max_headers = 2 * max_header_count
        self.max_head_bytes = 2 * max_header_bytes + 16 * 1024  # with the request line


class HttpProtocol(asyncio.Protocol):
    limits = _Limits(30.0, 100, 65536)  # replaced per server by protocol_class()

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if not config.loaded:
            config.load()
        self.loop = _loop or asyncio.get_running_loop()
        app = cast(ASGIApp, config.loaded_app)
        self._app = app
        # Only when the app is the gateway itself: a wrapped app's middleware must see every request.
        self._fast_routes: Mapping[str, ASGIApp] = getattr(app, "fast_routes", {})
        self._app_state = app_state
        self._state = server_state
        self._root_path = config.root_path
        self._keep_alive_timeout = float(config.timeout_keep_alive)
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._client: tuple[str, int] | None = None
        self._server: tuple[str, int] | None = None
        self._scheme = "http"
        self._deadline = Deadline(self.loop, self._deadline_passed)
        self._waiting = _HEAD
        self._head_begun = False  # the parser is inside a request head
        # The request being parsed, and the one being answered (the same one unless the client pipelines).
        self._parsing: Cycle | None = None
        self._active: Cycle | None = None
        self._pipeline: deque[tuple[Cycle, ASGIApp]] = deque()
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._expect_continue = False
        self._read_paused_by: Cycle | None = None  # the request whose unread body paused reading
        self._pipeline_paused = False
        self.write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self.written: asyncio.Future[None] = self.loop.create_future()  # what a send that did not wait returns
        self.written.set_result(None)
        self._closed = False
        self._refusal: tuple[int, str] | None = None  # why a callback stopped the parser: answered, then closed
        self._upgrade_body = 0  # body bytes still due of an Upgrade request answered as HTTP/1.1 (llhttp stopped)
        self._defaults_from: object = None  # uvicorn's default headers (date, server), as last rendered
        self._defaults = b""

    # -- asyncio.Protocol -------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self._transport = transport
        self._state.connections.add(self)  # type: ignore[arg-type]  # uvicorn's set holds its own protocols
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        self._client = (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) and len(peer) >= 2 else None
        self._server = (str(local[0]), int(local[1])) if isinstance(local, tuple) and len(local) >= 2 else None
        self._scheme = "https" if transport.get_extra_info("sslcontext") else "http"
        self._deadline.after(self.limits.header_timeout)

    def data_received(self, data: bytes) -> None:
        if self._upgrade_body:
            self._read_upgrade_body(data)
            return
        if self._waiting == _IDLE:
            # Between requests any byte, even a bare CRLF the parser skips, starts the head's deadline.
            self._waiting = _HEAD
            self._deadline.after(self.limits.header_timeout)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            # No protocol upgrades here: the request is answered as plain HTTP, and the connection closes after
            # it (the parser cannot go on past an upgrade). llhttp ends the message at its head; a body it
            # declared (curl --http2 and Java's HttpClient offer h2c on a POST) is read here.
            if self._parsing is not None:
                self._parsing.keep_alive = False
            if self._refusal is not None:
                self._refuse(*self._refusal)
            elif self._upgrade_body:
                self._read_upgrade_body(data[upgrade.args[0] :])
            else:
                self._pause_reading()
        except httptools.HttpParserError as exc:
            if self._refusal is not None:
                self._refuse(*self._refusal)
            else:
                self._refuse(400, f"Invalid HTTP request: {exc}.")

    def eof_received(self) -> bool:
        return False  # the client closed its side: close ours (connection_lost follows)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._state.connections.discard(self)
        for cycle in (self._active, self._parsing, *(queued for queued, _ in self._pipeline)):
            if cycle is not None:
                cycle.lost()
        self._pipeline.clear()
        self._resume_writing_waiters()
        # The protocol, its parser (whose callbacks are the protocol's methods), its deadline and its cycles
        # refer to each other: left as they are, only the cyclic collector would free them, and under a wave
        # of short connections the generations it rarely visits fill up (RSS grows). Cut the loops now.
        self._deadline.close()
        self._active = self._parsing = None
        del self._parser

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._resume_writing_waiters()

    # -- httptools callbacks ----------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._head_begun = True
        self._url = b""
        self._headers = []
        self._head_bytes = 0
        self._expect_continue = False

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._head_begun:  # a trailer, after a chunked body: no header of the request (RFC 9110 6.5.1)
            return
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self._expect_continue = True
        self._headers.append((name, value))
        self._head_bytes += len(name) + len(value)
        limits = self.limits
        if len(self._headers) > limits.max_headers or self._head_bytes > limits.max_head_bytes:
            self._refusal = (431, "The request head is too large.")
            raise ValueError("request head too large")  # the parser stops; data_received answers

    def on_headers_complete(self) -> None:
        self._head_begun = False
        if self._waiting == _HEAD:
            self._waiting = _BUSY
            self._deadline.clear()
        parser = self._parser
        method = parser.get_method().decode("ascii")
        http_version = parser.get_http_version()
        try:
            url = httptools.parse_url(self._url)
        except httptools.HttpParserInvalidURLError:
            # llhttp's URL parser holds offsets in 16 bits: a longer target is refused as too long
            self._refusal = (
                (414, "The request target is longer than 65,535 bytes.")
                if len(self._url) > 0xFFFF
                else (400, "The request target is not a path (or an absolute URL).")
            )
            raise ValueError("bad request target") from None  # the parser stops; data_received answers
        raw_path = url.path
        path = raw_path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        root = self._root_path
        scope: Scope = {
            "type": "http",
            "asgi": _ASGI,
            "http_version": http_version,
            "server": self._server,
            "client": self._client,
            "scheme": self._scheme,
            "method": method,
            "root_path": root,
            "path": root + path,
            "raw_path": root.encode("ascii") + raw_path if root else raw_path,
            "query_string": url.query or b"",
            "headers": self._headers,
            "state": self._app_state.copy(),
        }
        app = self._fast_routes.get(path) if method == "POST" else None
        fast = app is not None
        if app is None:
            app = self._app
        cycle = Cycle(
            self,
            scope,
            keep_alive=http_version != "1.0" and parser.should_keep_alive(),
            expect_continue=self._expect_continue,
            proxied=fast,
        )
        scope["extensions"] = {CYCLE: cycle}
        self._parsing = cycle
        if self._active is None:
            self._start(cycle, app)
        else:  # pipelined: answered after the ones before it
            self._pipeline.append((cycle, app))
            self._pause_reading_for_pipeline()

    def on_body(self, body: bytes) -> None:
        cycle = self._parsing
        if cycle is not None and not cycle.response_complete:
            cycle.feed_body(body)

    def on_message_complete(self) -> None:
        cycle = self._parsing
        if cycle is not None:
            if self._parser.should_upgrade():  # the message "ends" at its head: its body is still to come
                headers = cycle.scope["headers"]
                if any(name == b"transfer-encoding" for name, _ in headers):
                    # llhttp stopped at the head: a chunked body cannot be decoded here (one with a
                    # Content-Length can), so the request is refused rather than sent on without its body
                    self._refusal = (400, "A request offering an Upgrade cannot have a chunked body here.")
                    return
                self._upgrade_body = _content_length(headers)
                if self._upgrade_body:
                    return
            cycle.scope[BODY_RECEIVED] = True  # the whole body is here: the proxy reads it without a timer
            cycle.end_body()

    def _read_upgrade_body(self, data: bytes) -> None:
        """The body of an Upgrade request, up to its declared length; what follows is the offered protocol's."""
        body = data[: self._upgrade_body]
        self._upgrade_body -= len(body)
        cycle = self._parsing
        if cycle is None:
            return
        if body:
            self.on_body(body)
        if not self._upgrade_body:
            self._pause_reading()
            cycle.scope[BODY_RECEIVED] = True
            cycle.end_body()

    # -- the cycles' side -------------------------------------------------------------------------------

    def _start(self, cycle: Cycle, app: ASGIApp) -> None:
        self._active = cycle
        # uvicorn waits for (and at the end of its grace period cancels) the tasks in this set; the cycle takes
        # its task out when it ends, which costs less than a done callback (another loop callback per request).
        self._state.tasks.add(self.loop.create_task(cycle.run(app, self._state.tasks)))

    def write(self, data: bytes) -> None:
        transport = self._transport
        if transport is not None and not self._closed and not transport.is_closing():
            transport.write(data)

    def writelines(self, parts: list[bytes]) -> None:
        transport = self._transport
        if transport is not None and not self._closed and not transport.is_closing():
            transport.writelines(parts)

    def default_headers(self) -> bytes:
        """uvicorn's default response headers (date, server), rendered once for each time it renews them."""
        headers = self._state.default_headers
        if headers is not self._defaults_from:
            self._defaults = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
            self._defaults_from = headers
        return self._defaults

    async def drain(self) -> None:
        if not self.write_paused or self._closed:
            return
        await asyncio.shield(self.drained())

    def drained(self) -> asyncio.Future[None]:
        """Done when the transport takes writes again (or the connection is gone)."""
        if not self.write_paused or self._closed:
            return self.written
        if self._drain is None:
            self._drain = self.loop.create_future()
        return self._drain

    def _resume_writing_waiters(self) -> None:
        drain = self._drain
        if drain is not None:
            self._drain = None
            if not drain.done():
                drain.set_result(None)

    def pause_reading_for(self, cycle: Cycle) -> None:
        if self._read_paused_by is None and not self._closed:
            self._read_paused_by = cycle
            self._pause_reading()

    def resume_reading_for(self, cycle: Cycle) -> None:
        if self._read_paused_by is cycle:
            self._read_paused_by = None
            self._resume_reading()

    def response_done(self, cycle: Cycle) -> None:
        """The response's last byte is written: the next request may be answered."""
        self._state.total_requests += 1
        if cycle is not self._active:
            return
        self._active = None
        if self._read_paused_by is cycle:
            self._read_paused_by = None
            self._resume_reading()
        if self._closed:
            return
        if not cycle.keep_alive:
            self._close()
            return
        if self._pipeline:
            self._start(*self._pipeline.popleft())
            if not self._pipeline and self._pipeline_paused:
                self._pipeline_paused = False
                self._resume_reading()
            return
        if self._head_begun:  # the client pipelined part of its next head: its deadline runs from now
            self._waiting = _HEAD
            self._deadline.after(self.limits.header_timeout)
        else:
            self._waiting = _IDLE
            self._deadline.after(self._keep_alive_timeout)

    def abort_response(self, cycle: Cycle) -> None:
        """The response cannot be completed: close the connection, so the client cannot take it as whole."""
        cycle.keep_alive = False
        if self._transport is not None and not self._closed:
            self._transport.close()

    # -- uvicorn's server ---------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Graceful shutdown: an idle connection closes now, a busy one after its response."""
        active = self._active
        if active is None:
            self._close()
            return
        active.keep_alive = False
        for queued, _ in self._pipeline:
            queued.keep_alive = False

    # -- internals ------------------------------------------------------------------------------------------

    def _deadline_passed(self) -> None:
        if self._waiting != _BUSY:
            self._close()

    def _refuse(self, status: int, message: str) -> None:
        """Answer bytes that are not a request we can take, then close. A request whose own body broke is given
        up (its app sees the client leave), and answered when it has not begun its response; one answered
        before the broken one finishes first."""
        LOGGER.warning("refused a request: %s", message)
        active = self._active
        if active is not None:
            active.keep_alive = False
            self._pause_reading()
            if active is self._parsing and active.more_body:
                answered = active.response_started
                active.lost()
                if not answered:
                    self._answer_and_close(status, message)
                self._close()
            return
        self._answer_and_close(status, message)

    def _answer_and_close(self, status: int, message: str) -> None:
        body = error_body(message, "invalid_request_error", None, None)
        head = b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body)
        self.write(STATUS_LINES[status] + head + body)
        self._close()

    def _close(self) -> None:
        if self._transport is not None and not self._closed and not self._transport.is_closing():
            self._transport.close()

    def _pause_reading(self) -> None:
        if self._transport is not None and not self._closed:
            self._transport.pause_reading()

    def _resume_reading(self) -> None:
        transport = self._transport
        if transport is not None and not self._closed and self._read_paused_by is None and not self._pipeline_paused:
            transport.resume_reading()

    def _pause_reading_for_pipeline(self) -> None:
        if not self._pipeline_paused:
            self._pipeline_paused = True
            self._pause_reading()


def _content_length(headers: list[tuple[bytes, bytes]]) -> int:
    """A request's declared Content-Length (0 without one, or with one that is not a number)."""
    for name, value in headers:
        if name == b"content-length":
            return int(value) if value.isdigit() else 0
    return 0


def protocol_class(header_timeout: float, max_header_count: int, max_header_bytes: int) -> type[HttpProtocol]:
    """The protocol class for one server's `uvicorn.Config(http=...)`, with that server's limits."""
    limits = _Limits(header_timeout, max_header_count, max_header_bytes)
    return type("HttpProtocol", (HttpProtocol,), {"limits": limits})
