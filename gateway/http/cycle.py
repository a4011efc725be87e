"""One request and its response on a client connection: the ASGI `receive` and `send` the app is given.

The response's head is held until its first body bytes, so that a small answer's head and body leave in one
write (one syscall, one TCP segment). An app's head sent alone goes out at the end of the loop iteration it was
sent in; a proxied route's waits for its next send (the relay sends an empty chunk when the backend has no body
bytes yet), which saves a loop callback per request. A chunk of a stream is framed and written at once. Writing
waits while the client is slow (the transport's flow control), and reading the request body pauses while the
app has not taken what came.

ASGI extension: `scope["extensions"][CYCLE]` (`server_cycle(scope)`) is the cycle itself, for the proxy:
`on_disconnect(callback)` calls back synchronously when the client leaves before the response is complete, so
the proxy cancels its upstream request at once without a task waiting in `receive()`; and `write_chunk(data)`
writes a stream's chunk from a callback (proxy/relay.py pumps a stream's tokens with no task wake-up per token).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Scope

from gateway.errors import AnswerTruncated, error_body

if TYPE_CHECKING:
    from gateway.http.protocol import HttpProtocol

CYCLE = "switchyard.cycle"
BODY_RECEIVED = "switchyard.body_received"  # scope key: the whole body arrived before the app started
HIGH_WATER = 64 * 1024  # request body bytes buffered before reading from the client pauses
_JOIN_LIMIT = 16 * 1024  # a body chunk up to this size is copied behind its framing: one write, one segment
_HEADER_NAME = re.compile(rb'[\x00-\x1f\x7f()<>@,;:\[\]={} \t\\"]')
_HEADER_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_DISCONNECTED: Message = {"type": "http.disconnect"}
LOGGER = logging.getLogger("switchyard.http")


def server_cycle(scope: Scope) -> Cycle | None:
    """The gateway server's cycle of this request, or None under another ASGI server."""
    extensions = scope.get("extensions")
    cycle = extensions.get(CYCLE) if extensions else None
    return cycle if isinstance(cycle, Cycle) else None


def _status_line(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase.encode()
    except ValueError:
        phrase = b""
    return b"HTTP/1.1 %d %s\r\n" % (status, phrase)


STATUS_LINES = {status: _status_line(status) for status in range(100, 600)}
_INTERNAL_ERROR = error_body("The gateway failed to answer this request.", "internal_error")


class Cycle:
    __slots__ = (
        "_chunked",
        "_continue",
        "_final_taken",
        "_head",
        "_on_disconnect",
        "_protocol",
        "_proxied",
        "_remaining",
        "_waiter",
        "body",
        "body_size",
        "disconnected",
        "keep_alive",
        "more_body",
        "response_complete",
        "response_started",
        "scope",
    )

    def __init__(
        self, protocol: HttpProtocol, scope: Scope, keep_alive: bool, expect_continue: bool, proxied: bool
    ) -> None:
        self.scope = scope
        self._protocol = protocol
        self.keep_alive = keep_alive
        self._continue = expect_continue  # a 100 Continue is owed once the app reads the body
        # A proxied route's endpoint: its headers come from httptools (which refuses CR, LF and NUL in them) or
        # the gateway itself, so they are not validated again; it sends its head with the next body message.
        self._proxied = proxied
        # Request body, as the parser delivers it.
        self.body: list[bytes] = []
        self.body_size = 0
        self.more_body = True
        self._final_taken = False  # receive() returned the body's last message
        self._waiter: asyncio.Future[None] | None = None
        # Response.
        self.response_started = False
        self.response_complete = False
        self.disconnected = False
        self._head: bytes | None = None  # the response head, until its first body bytes or the iteration's end
        self._chunked = False
        self._remaining = -1  # bytes the declared content-length still expects (-1: none declared)
        self._on_disconnect: Callable[[], None] | None = None

    # -- the protocol's side ----------------------------------------------------------------------------

    async def run(self, app: ASGIApp, tasks: set[asyncio.Task[None]]) -> None:
        """Answer the request with `app`; then leave `tasks`, the server's set of running requests."""
        try:
            await app(self.scope, self.receive, self.send)
        except AnswerTruncated:
            self._protocol.abort_response(self)  # the proxy's way of saying: this answer cannot be completed
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                LOGGER.error("unhandled error answering %s %s", self.scope["method"], self.scope["path"], exc_info=exc)
            if not self.response_started and not self.disconnected:
                await self._send_internal_error()
            else:
                self._protocol.abort_response(self)
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
        else:
            if not self.response_started and not self.disconnected:
                LOGGER.error("%s %s: the app returned without a response", self.scope["method"], self.scope["path"])
                await self._send_internal_error()
            elif not self.response_complete and not self.disconnected:
                LOGGER.error("%s %s: the app returned mid-response", self.scope["method"], self.scope["path"])
                self._protocol.abort_response(self)
        finally:
            self._on_disconnect = None
            extensions = self.scope.get("extensions")
            if extensions:
                extensions.pop(CYCLE, None)  # the scope and its cycle refer to each other: cut the loop
            task = asyncio.current_task(self._protocol.loop)
            if task is not None:
                tasks.discard(task)

    def feed_body(self, data: bytes) -> None:
        self.body.append(data)
        self.body_size += len(data)
        if self.body_size > HIGH_WATER:
            self._protocol.pause_reading_for(self)
        self._wake()

    def end_body(self) -> None:
        self.more_body = False
        self._wake()

    def lost(self) -> None:
        """The client connection is gone."""
        if self.response_complete:
            return
        self.disconnected = True
        self._wake()
        callback = self._on_disconnect
        if callback is not None:
            self._on_disconnect = None
            callback()

    def on_disconnect(self, callback: Callable[[], None] | None) -> None:
        """Call `callback` (once, synchronously) if the client leaves before the response is complete; None
        stops watching."""
        self._on_disconnect = callback

    def write_chunk(self, data: bytes) -> bool:
        """Write a chunk of a started response's body at once; False when the client's window is full and more
        should wait for `drained()`."""
        if not self.disconnected and self.response_started and not self.response_complete:
            if self._chunked and self._head is None and self._remaining < 0 and 0 < len(data) <= _JOIN_LIMIT:
                # a stream's next tokens, the common case: framed as one bytes, one write
                self._protocol.write(b"%x\r\n%b\r\n" % (len(data), data))
            else:
                self._body(data, True)
        return not self._protocol.write_paused

    def drained(self) -> asyncio.Future[None]:
        """Done when the client can take more (at once when it can now, or when it has gone)."""
        return self._protocol.drained()

    # -- ASGI -------------------------------------------------------------------------------------------

    async def receive(self) -> Message:
        if self._continue:
            self._continue = False
            self._protocol.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        while True:
            if self.disconnected or self.response_complete:
                return _DISCONNECTED
            if self.body or (not self.more_body and not self._final_taken):
                body = self.body
                data = body[0] if len(body) == 1 else b"".join(body)
                self.body = []
                self.body_size = 0
                more = self.more_body
                self._final_taken = not more
                self._protocol.resume_reading_for(self)
                return {"type": "http.request", "body": data, "more_body": more}
            self._protocol.resume_reading_for(self)
            waiter = self._waiter = self._protocol.loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    def send(self, message: Message) -> Awaitable[None]:
        """ASGI's send. Written at once unless the client is slow: the awaitable returned is then the wait for
        it (not a coroutine per message, which cost more than writing a small chunk)."""
        if self._protocol.write_paused and not self.disconnected:
            return self._send_when_drained(message)
        self._write_message(message)
        return self._protocol.written

    async def _send_when_drained(self, message: Message) -> None:
        await self._protocol.drain()
        self._write_message(message)

    def _write_message(self, message: Message) -> None:
        if self.disconnected:
            return
        if not self.response_started:
            if message["type"] != "http.response.start":
                raise RuntimeError(f"expected http.response.start, got {message['type']!r}")
            self._start(message["status"], message.get("headers", ()))
        elif not self.response_complete:
            if message["type"] != "http.response.body":
                raise RuntimeError(f"expected http.response.body, got {message['type']!r}")
            self._body(message.get("body", b""), message.get("more_body", False))
        else:
            raise RuntimeError(f"{message['type']!r} sent after the response was complete")

    # -- writing the response ---------------------------------------------------------------------------

    def _start(self, status: int, headers: Any) -> None:
        self.response_started = True
        self._continue = False
        protocol = self._protocol
        if self.more_body:
            self.keep_alive = False  # answered before the whole body came: the rest cannot be told apart
        line = STATUS_LINES.get(status) or _status_line(status)
        parts = [line, protocol.default_headers()]
        length = -1
        chunked = False
        close = False
        proxied = self._proxied
        for name, value in headers:
            if proxied:
                lower = name  # the proxy's header names are lower case already (upstream.py, its own)
            elif _HEADER_NAME.search(name) or _HEADER_VALUE.search(value):
                raise RuntimeError(f"invalid response header {name!r}")
            else:
                lower = name.lower()
            if lower == b"content-length":
                length = int(value)
            elif lower == b"transfer-encoding":
                chunked = value.lower() == b"chunked"
            elif lower == b"connection" and b"close" in value.lower():
                close = True
            parts += (name, b": ", value, b"\r\n")
        if close:
            self.keep_alive = False
        bodiless = self.scope["method"] == "HEAD" or status in (204, 304) or status < 200
        if length < 0 and not chunked and not bodiless:
            if self.scope.get("http_version") == "1.0":
                self.keep_alive = False  # an HTTP/1.0 client knows no chunks: the body ends with the connection
            else:
                chunked = True
                parts.append(b"transfer-encoding: chunked\r\n")
        if not self.keep_alive and not close:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        self._chunked = chunked and not bodiless
        self._remaining = -1 if bodiless else length
        self._head = b"".join(parts)
        if not self._proxied:
            protocol.loop.call_soon(self._flush_head)

    def _flush_head(self) -> None:
        head = self._head
        if head is not None:
            self._head = None
            self._protocol.write(head)

    def _body(self, body: bytes, more_body: bool) -> None:
        if self.scope["method"] == "HEAD":
            body = b""
        elif self._remaining >= 0:
            self._remaining -= len(body)
            if self._remaining < 0:
                raise RuntimeError("the response body is longer than its content-length")
        head = self._head
        self._head = None
        if self._chunked:
            if body:
                framing = b"%x\r\n" % len(body)
                tail = b"\r\n" if more_body else b"\r\n0\r\n\r\n"
                if len(body) <= _JOIN_LIMIT:
                    self._write((head or b"") + framing + body + tail)
                else:
                    self._writelines(head, framing, body, tail)
            elif not more_body:
                self._write((head or b"") + b"0\r\n\r\n")
            elif head is not None:
                self._write(head)
        elif body:
            if head is None:
                self._write(body)
            elif len(body) <= _JOIN_LIMIT:
                self._write(head + body)
            else:
                self._writelines(head, body)
        elif head is not None:
            self._write(head)
        if not more_body:
            if self._remaining > 0:
                self._protocol.abort_response(self)
                raise RuntimeError("the response body is shorter than its content-length")
            self.response_complete = True
            self._wake()
            self._protocol.response_done(self)

    def _write(self, data: bytes) -> None:
        self._protocol.write(data)

    def _writelines(self, *parts: bytes | None) -> None:
        self._protocol.writelines([part for part in parts if part])

    async def _send_internal_error(self) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(_INTERNAL_ERROR))]
        self.keep_alive = False
        self.response_started = False
        self._head = None
        self._start(500, headers)
        self._body(_INTERNAL_ERROR, False)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
