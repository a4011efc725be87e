"""The proxy's HTTP/1.1 client: pooled keep-alive connections to the backends, responses parsed by httptools.

Why not aiohttp on this path: bench/overhead.py showed aiohttp's client at 35-45 % of the gateway's CPU per
proxied request. Relaying needs far less than a general client: write one request in one call, parse the
response head, hand body bytes over as they arrive (with flow control), keep the connection for the next
request. This does that at about half the cost. aiohttp still serves the control plane (model polls, health
checks, metric scrapes), where generality matters more than microseconds.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from typing import cast
from urllib.parse import urlsplit

import httptools

from gateway.errors import BadResponse, BodyBroken, ConnectFailed, HeadTimeout, IdleTimeout, Unanswered, UpstreamError
from gateway.http.deadline import Deadline

HIGH_WATER = 256 * 1024  # buffered response bytes at which reading from the backend pauses
# A close without an answer this soon after the request went out crossed it (about a round trip, plus the
# event loop's lag): the backend had closed before it read the request. Later, it may have worked on it
# (Unanswered: attempts tries another backend, the pool does not send it to this one again).
UNREAD_S = 0.1
MAX_IDLE_PER_ORIGIN = 512  # idle keep-alive connections kept per backend; more are closed when released
_SINGLE_WRITE = 256 * 1024  # request bodies up to this size are joined to the head: one write, one segment


class Origin:
    """One backend base URL: where to connect, and its connections."""

    __slots__ = ("awaiting", "base_url", "host", "host_header", "idle", "open", "port", "prefix", "secure")

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        if parts.hostname is None:
            raise ValueError(f"no host in {base_url!r}")
        self.base_url = base_url
        self.secure = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.secure else 80)
        self.host_header = parts.netloc.rpartition("@")[2].encode("idna")
        self.prefix = parts.path.rstrip("/").encode()  # a backend behind a path, e.g. http://host/team-a
        self.idle: list[_Connection] = []  # most recently released last: reuse the warmest first
        self.awaiting: set[_Connection] = set()  # connections whose request waits for its response head
        # Connections being made, idle or in use: the origin is forgotten only when none is left, so no
        # connection ever belongs to an origin the pool no longer knows.
        self.open = 0


class UpstreamPool:
    """Keep-alive connections per backend. Owned by the app's lifespan; `close()` ends it.

    There is no cap on connections in use: one per request in flight. Concurrency is bounded, when it is,
    by admission control (`admission.max_inflight`, unlimited by default)."""

    def __init__(self, keepalive: float, connect_timeout: float) -> None:
        self._keepalive = keepalive
        self._connect_timeout = connect_timeout
        self._origins: dict[str, Origin] = {}  # backends with open connections (pods come and go)
        self._tls: ssl.SSLContext | None = None
        self._closed = False

    async def request(
        self,
        base_url: str,
        method: bytes,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
        head_timeout: float,
    ) -> UpstreamResponse:
        """Send one request and return once the response head is in; the body is read from the response.

        No head within `head_timeout` seconds of sending raises HeadTimeout. Cancelling this (a client
        that left) or a timeout aborts the connection, which tells the backend to stop."""
        if self._closed:
            raise ConnectFailed("the connection pool is closed")
        origin = self._origin(base_url)
        head = request_head(method, origin.prefix + target, origin.host_header, headers, body)
        while origin.idle:
            connection = origin.idle.pop()
            if not connection.take():
                continue
            try:
                return await connection.exchange(head, body, head_timeout, method == b"HEAD")
            except ConnectFailed:
                # A kept-alive connection the backend closed just as it was reused, before it read the request:
                # it is sent again once, on a new connection.
                break
        connection = await self._connect(base_url)
        return await connection.exchange(head, body, head_timeout, method == b"HEAD")

    async def fetch(
        self, base_url: str, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes, idle: float
    ) -> tuple[int, bytes]:
        """POST a small request and read the whole answer (for the gateway's own calls, e.g. /tokenize); `idle`
        bounds each wait, the caller the whole."""
        response = await self.request(base_url, b"POST", target, headers, body, idle)
        try:
            parts = []
            while chunk := await response.readany(idle):
                parts.append(chunk)
            return response.status, b"".join(parts)
        finally:
            response.close()

    def _origin(self, base_url: str) -> Origin:
        origin = self._origins.get(base_url)
        if origin is None:
            origin = self._origins[base_url] = Origin(base_url)
        return origin

    async def _connect(self, base_url: str) -> _Connection:
        origin = self._origin(base_url)  # again: the last connection of the one looked up may have closed
        origin.open += 1
        tls = None
        if origin.secure:
            tls = self._tls = self._tls or ssl.create_default_context()
        made: list[_Connection] = []
        loop = asyncio.get_running_loop()

        def protocol() -> _Connection:
            made.append(_Connection(self, origin, loop))
            return made[-1]

        try:
            async with asyncio.timeout(self._connect_timeout):
                _, connection = await loop.create_connection(
                    protocol,
                    origin.host,
                    origin.port,
                    ssl=tls,
                    server_hostname=origin.host if tls else None,
                )
        except BaseException as exc:
            # Failing after the socket connected (a cancellation, a TLS error), the loop may or may not report
            # connection_lost to the protocol: the count drops exactly once either way.
            if made:
                made[0].abort()
                made[0].forget()
            else:
                self.closed(origin)
            if isinstance(exc, TimeoutError):
                raise ConnectFailed(f"connect timed out after {self._connect_timeout:g} s") from None
            if isinstance(exc, OSError):
                raise ConnectFailed(f"connect failed: {exc.strerror or exc}") from None
            raise
        return connection

    def abandon(self, base_url: str, reason: str) -> None:
        """Fail the requests to `base_url` that have no response head yet with Unanswered, which the attempts
        retry on other backends: health checks declared it dead, and its `first_byte` wait could be long."""
        origin = self._origins.get(base_url)
        if origin is not None:
            for connection in list(origin.awaiting):
                connection.abandon(reason)

    def release(self, connection: _Connection, origin: Origin) -> bool:
        """Keep a connection whose response ended for the next request; False when it must close."""
        if self._closed or len(origin.idle) >= MAX_IDLE_PER_ORIGIN:
            return False
        origin.idle.append(connection)
        connection.park(self._keepalive)
        return True

    def closed(self, origin: Origin) -> None:
        origin.open -= 1
        self._forget_if_unused(origin)

    def _forget_if_unused(self, origin: Origin) -> None:
        if origin.open == 0 and self._origins.get(origin.base_url) is origin:
            del self._origins[origin.base_url]

    def close(self) -> None:
        """Close every idle connection; connections in use close when their response ends."""
        self._closed = True
        for origin in self._origins.values():
            while origin.idle:
                origin.idle.pop().expire()

    def idle_connections(self) -> int:
        return sum(len(origin.idle) for origin in self._origins.values())

    def open_connections(self) -> int:
        return sum(origin.open for origin in self._origins.values())

    def origins(self) -> int:
        """Backends the pool holds state for (only those with open connections)."""
        return len(self._origins)


def request_head(
    method: bytes, target: bytes, host: bytes, headers: Sequence[tuple[bytes, bytes]], body: bytes
) -> bytes:
    parts = [method, b" ", target, b" HTTP/1.1\r\nhost: ", host, b"\r\n"]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    if body or method not in (b"GET", b"HEAD", b"DELETE", b"OPTIONS"):
        parts += (b"content-length: ", b"%d" % len(body), b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


class UpstreamResponse:
    """A response whose head has arrived; body bytes queue here as the backend sends them."""

    __slots__ = (
        "_buffer",
        "_buffered",
        "_connection",
        "_error",
        "_head",
        "_holding",
        "_idle_deadline",
        "_idle_limit",
        "_idle_timer",
        "_loop",
        "_sink",
        "_stopped",
        "_waiter",
        "complete",
        "content_type",
        "raw_headers",
        "status",
    )

    def __init__(self, connection: _Connection, head: asyncio.Future[None]) -> None:
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []  # names in lower case
        self.content_type = b""  # the media type, lower case and without parameters (b"" when absent)
        self.complete = False  # the backend sent the whole body
        self._connection: _Connection | None = connection  # until complete or closed
        self._head = head
        self._buffer: deque[bytes] = deque()
        self._buffered = 0
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        # One idle timer per response, not one per read: a stream waits once a token, and a timer armed and
        # cancelled each time cost more than the chunk's own bookkeeping. It fires at the deadline of the
        # first wait and moves itself to the current wait's deadline until one is missed.
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_deadline = 0.0
        self._idle_limit = 0.0
        # Pumping (`pump`): the chunks go to a sink as they arrive, rather than into the buffer.
        self._sink: Callable[[bytes], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._holding = False  # the sink's client is slow: reading waits, and so does the idle clock
        self._stopped = False

    def ready(self) -> bool:
        """Body bytes, or the body's end, are here: reading now does not wait."""
        return bool(self._buffer) or self.complete or self._error is not None

    def at_eof(self) -> bool:
        return self.complete and not self._buffer

    def read_nowait(self) -> bytes:
        """Everything buffered so far (b"" when nothing is)."""
        buffer = self._buffer
        if not buffer:
            return b""
        data = buffer.popleft() if len(buffer) == 1 else b"".join(buffer)
        buffer.clear()
        self._buffered = 0
        if self._connection is not None:
            self._connection.resume()
        return data

    async def readany(self, idle_limit: float | None = None) -> bytes:
        """The next bytes of the body, waiting for them; b"" once the body ended.

        Raises BodyBroken, or IdleTimeout when nothing came for `idle_limit` seconds."""
        while not self._buffer:
            if self.complete:
                return b""
            if self._error is not None:
                raise self._error
            await self._wait(asyncio.get_running_loop(), idle_limit)
        return self.read_nowait()

    async def _wait(self, loop: asyncio.AbstractEventLoop, idle_limit: float | None) -> None:
        """Until the connection wakes the response (bytes, the end, a failure), or IdleTimeout."""
        waiter = self._waiter = loop.create_future()
        if idle_limit is not None:
            self._idle_deadline = deadline = loop.time() + idle_limit
            if self._idle_timer is None:
                self._idle_timer = loop.call_at(deadline, self._idle_check, loop, idle_limit)
        try:
            await waiter
        finally:
            self._waiter = None

    async def pump(self, sink: Callable[[bytes], None], idle_limit: float) -> None:
        """Hand the body to `sink` chunk by chunk as it arrives, until it ends: a stream's tokens go through
        without a wake-up of the reading task for each. Raises BodyBroken, or IdleTimeout when the backend sends
        nothing for `idle_limit` seconds while the client keeps up. The sink may `hold()` the backend while its
        client is slow, and `stop()` the pump when it has seen enough (the rest stays unread)."""
        self._stopped = False
        data = self.read_nowait()
        if data:
            sink(data)
        if self._stopped or self.complete:
            return
        if self._error is not None:
            raise self._error
        loop = self._loop = asyncio.get_running_loop()
        self._sink = sink
        self._idle_limit = idle_limit
        try:
            await self._wait(loop, idle_limit)
        finally:
            self._sink = None
        if self._error is not None and not self._stopped and not self.complete:
            raise self._error

    def stop(self) -> None:
        """End the pump now (from its sink)."""
        self._stopped = True
        self._sink = None
        self._wake()

    def hold(self) -> None:
        """Stop reading from the backend until `release()` (from the sink: its client cannot take more now)."""
        self._holding = True
        if self._connection is not None:
            self._connection.pause()

    def release(self) -> None:
        self._holding = False
        if self._loop is not None:
            self._idle_deadline = self._loop.time() + self._idle_limit  # the idle clock starts again now
        if self._connection is not None:
            self._connection.resume()

    def _idle_check(self, loop: asyncio.AbstractEventLoop, idle_limit: float) -> None:
        self._idle_timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # not waiting now: the next wait arms the timer again
        if self._holding:  # the client is slow, not the backend: look again an idle period from now
            self._idle_timer = loop.call_at(loop.time() + idle_limit, self._idle_check, loop, idle_limit)
            return
        if loop.time() >= self._idle_deadline:
            waiter.set_exception(IdleTimeout(idle_limit))
        else:
            self._idle_timer = loop.call_at(self._idle_deadline, self._idle_check, loop, idle_limit)

    def _stop_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def close(self) -> None:
        """Done with the response: a connection still carrying its body is aborted (the backend notices)."""
        self._stop_idle_timer()
        connection = self._connection
        if connection is not None:
            self._connection = None
            connection.abort()
        if not self.complete and self._error is None:
            self._error = BodyBroken("the response was closed")

    # Called by the connection.
    def _feed(self, data: bytes) -> bool:
        """Queue body bytes; True when the reader is far enough behind for reading to pause. While pumping they
        wait for the end of the read they came in (`_deliver`): a burst of chunks read at once goes to the sink,
        and on to the client, as one."""
        self._buffer.append(data)
        self._buffered += len(data)
        if self._sink is not None:
            return False  # the sink holds the backend itself when its client is slow
        self._wake()
        return self._buffered >= HIGH_WATER

    def _deliver(self) -> None:
        """Pumping: hand what the last read brought to the sink."""
        sink = self._sink
        if sink is None or not self._buffer:
            return
        buffer = self._buffer
        data = buffer.popleft() if len(buffer) == 1 else b"".join(buffer)
        buffer.clear()
        self._buffered = 0
        assert self._loop is not None
        self._idle_deadline = self._loop.time() + self._idle_limit
        sink(data)

    def _finish(self) -> None:
        self._deliver()
        self.complete = True
        self._connection = None
        self._stop_idle_timer()
        self._wake()

    def _fail(self, error: UpstreamError) -> None:
        self._deliver()  # what came before the failure goes on first, as a reader would get it
        self._connection = None
        self._stop_idle_timer()
        if not self._head.done():
            self._head.set_exception(error)
            return
        self._error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Connection(asyncio.Protocol):
    """One TCP connection to a backend, carrying one request at a time.

    One deadline (http/deadline.py) serves both of its limits: the response head due `head_timeout` after the
    request went out, and, idle in the pool, the end of its keep-alive."""

    def __init__(self, pool: UpstreamPool, origin: Origin, loop: asyncio.AbstractEventLoop) -> None:
        self._pool = pool
        self._origin = origin
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._response: UpstreamResponse | None = None
        self._received = False  # a byte of the current response arrived
        self._framed = False  # the current response's body has a length or chunks (else it ends at close)
        self._bodiless = False  # the current request is HEAD
        self._paused = False
        self._closed = False
        self._counted = True  # in the origin's `open` count (made by the pool before connecting)
        self._loop = loop
        self._deadline = Deadline(loop, self._deadline_passed)
        self._head_timeout = 0.0
        self._sent_at = 0.0  # loop time the current request went out
        self._parked = False  # idle in its origin's list

    # The pool's side.
    def park(self, keepalive: float) -> None:
        """Idle in the pool, for at most `keepalive` seconds."""
        self._parked = True
        self._deadline.after(keepalive)

    def take(self) -> bool:
        """Leave the idle list for a request; False when the connection is no longer usable."""
        self._parked = False
        self._deadline.clear()
        return not self._closed and self._transport is not None and not self._transport.is_closing()

    def expire(self) -> None:
        self._deadline.cancel()
        if self._parked:
            self._parked = False
            idle = self._origin.idle
            if self in idle:
                idle.remove(self)
        self.abort()

    def _deadline_passed(self) -> None:
        response = self._response
        if response is not None:
            if not response._head.done():
                self._response = None
                self.abort()
                response._fail(HeadTimeout(self._head_timeout))
        elif self._parked:
            self.expire()

    async def exchange(self, head: bytes, body: bytes, head_timeout: float, bodiless: bool) -> UpstreamResponse:
        transport = self._transport
        assert transport is not None
        assert self._response is None
        if self._closed:
            raise ConnectFailed("the connection closed before the request went out")
        started = self._loop.create_future()
        response = UpstreamResponse(self, started)
        self._response = response
        self._received = False
        self._bodiless = bodiless
        self._sent_at = self._loop.time()
        if len(body) <= _SINGLE_WRITE:
            transport.write(head + body)
        else:
            transport.writelines((head, body))
        self._head_timeout = head_timeout
        self._deadline.after(head_timeout)
        awaiting = self._origin.awaiting
        awaiting.add(self)
        try:
            await started
        except BaseException:
            if self._response is response:  # cancelled while the backend works: tell it
                self._response = None
                self.abort()
            raise
        finally:
            awaiting.discard(self)
        return response

    def abandon(self, reason: str) -> None:
        """Give up the current request if its response head has not come (the pool's `abandon`)."""
        response = self._response
        if response is not None and not response._head.done():
            self._response = None
            self.abort()
            response._fail(Unanswered(reason))

    def abort(self) -> None:
        self._closed = True
        self._deadline.cancel()
        if self._transport is not None:
            self._transport.abort()

    def pause(self) -> None:
        if not self._paused and not self._closed and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def resume(self) -> None:
        if self._paused and not self._closed:
            self._paused = False
            assert self._transport is not None
            self._transport.resume_reading()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        self._received = True
        if self._response is None:  # bytes nobody asked for: the connection cannot be trusted again
            self.abort()
            return
        try:
            self._parser.feed_data(data)
            response = self._response
            if response is not None and response._sink is not None:
                response._deliver()
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            response = self._response
            self._response = None
            self.abort()
            if response is not None:
                problem = (
                    "a protocol upgrade" if isinstance(exc, httptools.HttpParserUpgrade) else f"invalid HTTP: {exc}"
                )
                response._fail(_broken(response, f"the backend answered with {problem}"))

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def forget(self) -> None:
        """Leave the origin's count of open connections (once, whoever notices the end first)."""
        if not self._counted:
            return
        self._counted = False
        self._pool.closed(self._origin)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.forget()
        self._deadline.close()  # it and the parser call back into the connection: cut those loops
        del self._parser
        if self._parked:
            self._parked = False
            if self in self._origin.idle:
                self._origin.idle.remove(self)
        response = self._response
        if response is None:
            return
        self._response = None
        if response.status and not self._framed and exc is None:
            response._finish()  # a body without length or chunks ends when the connection closes (not resets)
        elif not self._received and self._loop.time() - self._sent_at <= UNREAD_S:
            # The close crossed the request: the backend closed the (kept-alive) connection before it could
            # have read it, so sending it again (another connection, another backend) runs it once.
            response._fail(ConnectFailed("the backend closed the connection as the request went out"))
        elif not self._received:  # it may have been read and worked on: not sent to this backend again
            response._fail(Unanswered("the backend closed the connection without answering"))
        else:
            response._fail(_broken(response, "the backend closed the connection mid-response"))

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._framed = False
        if self._response is None:  # a response nobody asked for (extra bytes after the last one)
            self.abort()

    # Each callback ignores what comes after abort(): the parser goes on with the bytes it was given.
    def on_header(self, name: bytes, value: bytes) -> None:
        response = self._response
        if response is not None and not response.status:  # with a status, a trailer: no header of the answer
            name = name.lower()
            if name == b"content-type":
                response.content_type = value.partition(b";")[0].strip().lower()
            elif name == b"content-length" or name == b"transfer-encoding":
                self._framed = True
            response.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        response = self._response
        if response is None:
            return
        status = self._parser.get_status_code()
        if status < 200:  # an interim answer (100 Continue, 103 Early Hints): the real head follows
            response.raw_headers.clear()
            response.content_type = b""
            self._framed = False
            return
        response.status = status
        if status in (204, 304):
            self._framed = True
        self._deadline.clear()
        response._head.set_result(None)
        if self._bodiless:
            # The answer to HEAD has no body, whatever its headers say; httptools cannot be told to skip
            # one, so the connection, its parser now expecting a body, is not reused.
            self._response = None
            response._finish()
            self.abort()

    def on_body(self, body: bytes) -> None:
        response = self._response
        if response is None:
            return
        if response._feed(body) and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def on_message_complete(self) -> None:
        response = self._response
        if response is None or self._parser.get_status_code() < 200:
            return
        self._response = None
        response._finish()
        self.resume()
        if not (self._parser.should_keep_alive() and self._pool.release(self, self._origin)):
            self.abort()


def _broken(response: UpstreamResponse, message: str) -> UpstreamError:
    return BodyBroken(message) if response.status else BadResponse(message)
