"""The proxied routes: one ASGI endpoint per route, and the request boundary they share.

A request goes through three stages, each in its own module: the gatekeeper (limits, key, body, model), the
attempts (admission, backends in turn, retries) and the relay (the answer, chunk by chunk). This module is
where they meet: every GatewayError they raise is answered here, a client that left is noticed here, and
every request, however it ended, is measured and logged here exactly once.

Pure ASGI on purpose: the request body is read once and forwarded as received, each upstream chunk is
written to the client as soon as it is read, and a client disconnect cancels the upstream request at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from time import perf_counter
from typing import cast

from starlette.types import Receive, Scope, Send

from gateway.errors import AnswerTruncated, ClientDisconnected, GatewayError
from gateway.proxy.attempts import Attempts
from gateway.proxy.disconnect import DisconnectWatch
from gateway.proxy.exchange import Exchange
from gateway.proxy.gatekeeper import Gatekeeper
from gateway.proxy.headers import RequestIds
from gateway.proxy.outcome import Outcome, Recorder
from gateway.proxy.request_body import BodyKind
from gateway.tracing import Tracing, end_server_span

CLIENT_CLOSED = 499  # nginx's code for "client closed the request", used in metrics only
STATE_KEY = "proxy"  # where the lifespan puts the Proxy in its state (scope["state"] of every request)


class Proxy:
    def __init__(self, gatekeeper: Gatekeeper, attempts: Attempts, recorder: Recorder, tracing: Tracing) -> None:
        self._gatekeeper = gatekeeper
        self._attempts = attempts
        self._recorder = recorder
        self._tracing = tracing
        self._ids = RequestIds()
        # Built in the lifespan, so on its loop: asyncio.current_task() without a loop asks the interpreter for
        # the running one, which checks the process id with a syscall.
        self._loop = asyncio.get_running_loop()

    async def handle(self, scope: Scope, receive: Receive, send: Send, route: str, kind: BodyKind) -> None:
        exchange = Exchange(scope, receive, send, route, kind, Outcome(self._ids.of(scope), perf_counter()))
        outcome = exchange.outcome
        if self._tracing.tracer is not None:
            exchange.span = self._tracing.server_span(route, scope["method"], scope["path"], scope["headers"])
        try:
            await self._gatekeeper.check(exchange)
            await self._forward(exchange)
        except GatewayError as exc:
            await exchange.send_error(exc)
        except ClientDisconnected:
            outcome.status = CLIENT_CLOSED
        except AnswerTruncated:
            raise  # out of the app, so that the server drops the connection (the relay set the status)
        finally:
            self._recorder.record(exchange.label, route, outcome, perf_counter() - outcome.started, exchange.principal)
            if exchange.span is not None:
                end_server_span(exchange.span, exchange)

    async def _forward(self, exchange: Exchange) -> None:
        task = asyncio.current_task(self._loop)
        assert task is not None
        watch = exchange.watch = DisconnectWatch(exchange.scope, exchange.receive, task)
        try:
            await self._attempts.run(exchange)
        except asyncio.CancelledError:
            if watch.disconnected:
                task.uncancel()
                if not exchange.outcome.delivered:
                    exchange.outcome.status = CLIENT_CLOSED
                return
            raise
        finally:
            watch.stop()


class ProxyEndpoint:
    """ASGI app for one proxied route; the Proxy comes from the lifespan's state, built with its resources."""

    def __init__(self, route: str, kind: BodyKind) -> None:
        self._route = route
        self._kind = kind

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # The Proxy's coroutine itself, not one awaiting it: one frame less for every request to go through.
        proxy = cast(Proxy, scope["state"][STATE_KEY])
        return proxy.handle(scope, receive, send, self._route, self._kind)
