"""uvicorn's httptools protocol with a deadline on request heads (nginx's client_header_timeout).

It extends uvicorn's private HttpToolsProtocol (and reads its `cycle`): uvicorn is pinned exactly, and
tests/gateway/proxy/test_client_protocol.py fails loudly when an upgrade changes what this relies on.

uvicorn times out idle keep-alive connections, but not one that connected and sent nothing, nor one that
trickles a request head a byte at a time: each would hold a file descriptor for as long as the client likes.
Here every connection must deliver a complete request head within `header_timeout` seconds of connecting
or of sending the first byte of its next request, or it is closed. Its writes go through a CorkedTransport,
so that a response's head and body leave in one syscall.
"""

from __future__ import annotations

import asyncio
from typing import cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.proxy.corked_transport import CorkedTransport
from gateway.proxy.request_body import BODY_RECEIVED


class HeadDeadlineProtocol(HttpToolsProtocol):
    header_timeout = 30.0  # set per server by with_header_timeout()

    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(cast(asyncio.Transport, CorkedTransport(transport, asyncio.get_running_loop())))
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        # Between requests, any byte stops uvicorn's keep-alive timer, even a bare CRLF that the parser
        # skips without beginning a message: the head deadline takes over from there.
        if self.cycle is None or self.cycle.response_complete:
            self._arm_head_timer()
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_head_timer()

    def on_headers_complete(self) -> None:
        self._disarm_head_timer()
        transport = self.transport
        if isinstance(transport, CorkedTransport):
            transport.cork()  # this request's answer: its head leaves with what follows it
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        if self.cycle is not None:
            scope = cast(dict[str, object], self.cycle.scope)  # uvicorn types it as an ASGI TypedDict
            scope[BODY_RECEIVED] = True  # the whole body is here: read_body takes it without a timer
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            # a response is still going out (a client that pipelined its next head): judge after it
            self._arm_head_timer()
            return
        if not self.transport.is_closing():
            self.transport.close()


def with_header_timeout(seconds: float) -> type[HeadDeadlineProtocol]:
    """The protocol class for uvicorn.Config(http=...), with this server's head deadline."""
    return type("HeadDeadlineProtocol", (HeadDeadlineProtocol,), {"header_timeout": seconds})
