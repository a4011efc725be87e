"""The last stage: the backend's answer to the client, each chunk as soon as it is read.

Reading pauses while the client is slow (uvicorn's flow control on one side, the pool's on the other), and
the idle timer runs only while the proxy waits on the backend. When the backend fails after the status line
went out, a failover-capable stream is continued on another backend (the attempts stage finds one, see
failover.py); any other SSE client is told in-band (an error event, then `[DONE]`); any other answer is cut
off, so that it cannot pass for a complete one.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable

from gateway.errors import AnswerTruncated, BodyBroken, ErrorEvent, UpstreamError, error_body, upstream_failure
from gateway.fleet.registry import Backend
from gateway.http.cycle import Cycle, server_cycle
from gateway.metrics import Metrics
from gateway.proxy.exchange import Exchange
from gateway.proxy.failover_stream import FailoverStream
from gateway.proxy.gatekeeper import RESPONSES_ROUTE
from gateway.proxy.headers import DROP_RESPONSE_HEADERS, DROP_RESPONSE_HEADERS_AND_LENGTH
from gateway.proxy.interfaces import Picker
from gateway.proxy.responses_api import ResponseDirectory
from gateway.proxy.sse import CRLF_SEP, DONE, SEP
from gateway.proxy.stream_observer import ChunkObserver, StreamFilter
from gateway.proxy.upstream import UpstreamResponse
from gateway.proxy.usage import UsageChunkFilter

SSE = b"text/event-stream"
# An empty body chunk: sends a head the server holds for the body that follows it (gateway/http/cycle.py).
HEAD_ONLY = {"type": "http.response.body", "body": b"", "more_body": True}

# Finds the continuation of a failed stream: (its response, its backend), or None to end the stream.
Takeover = Callable[[UpstreamError, Backend, FailoverStream], Awaitable[tuple[UpstreamResponse, Backend] | None]]


class Relay:
    def __init__(self, metrics: Metrics, idle_timeout: float, responses: ResponseDirectory, picker: Picker) -> None:
        self._metrics = metrics
        self._idle_timeout = idle_timeout
        self._responses = responses
        self._picker = picker

    async def relay(
        self, exchange: Exchange, response: UpstreamResponse, backend: Backend, takeover: Takeover | None = None
    ) -> None:
        outcome = exchange.outcome
        is_sse = response.content_type == SSE
        plan = exchange.failover
        stream = None
        if plan is not None and plan.capable and is_sse and response.status == 200:
            stream = FailoverStream(plan)
        hide_usage = exchange.hide_usage and is_sse
        stream_filter: StreamFilter | None = stream or (UsageChunkFilter() if hide_usage else None)
        # A rewritten body is not as long as the backend declared.
        drop = DROP_RESPONSE_HEADERS_AND_LENGTH if stream_filter is not None else DROP_RESPONSE_HEADERS
        headers = [(name, value) for name, value in response.raw_headers if name not in drop]  # names in lower case
        headers.append((b"x-request-id", outcome.request_id))
        headers += outcome.extra_headers
        itl = self._metrics.model_series(exchange.label).itl
        # the request's prefill is done at its first token: its charge on the backend is released then
        discharge = functools.partial(self._picker.discharge, exchange.info)
        responses = exchange.route == RESPONSES_ROUTE
        observer = ChunkObserver(is_sse, stream_filter, outcome.started, itl, discharge, responses)
        learn_response_id = responses and response.status == 200
        try:
            await exchange.send({"type": "http.response.start", "status": response.status, "headers": headers})
            if not response.ready():  # nothing to send with the head: it goes now, not with the first chunk
                await exchange.send(HEAD_ONLY)
            # Under the gateway's own server an event stream is pumped: each chunk goes on from the upstream
            # connection's callback, with no wake-up of this task per token.
            cycle = server_cycle(exchange.scope) if is_sse else None
            copy = self._copy if cycle is None else functools.partial(self._pump, cycle)
            failure = await copy(exchange, response, observer, learn_response_id, backend, stream)
            while failure is not None:
                self._count_failure(exchange, failure, backend)
                if stream is None or takeover is None:
                    break
                response.close()  # tells a stalled or erring backend to stop
                resumed = await takeover(failure, backend, stream)
                if resumed is None:
                    break
                response, backend = resumed
                observer.await_first_token()  # the continuation's prefill ends at its first token
                failure = await copy(exchange, response, observer, False, backend, stream)
        except asyncio.CancelledError:
            if observer.done:  # the client hung up after the stream's end: it had the whole answer
                outcome.delivered = True
                outcome.usage, outcome.usage_tail = observer.usage()
            elif is_sse:  # it left before the usage came: charged what routing and the relay know
                prompt = self._picker.prompt_tokens(exchange.info) or 0
                outcome.unreported_tokens = prompt + observer.content_events
            raise
        finally:
            response.close()  # no-op once released; drops the upstream connection when cut short
            outcome.ttft = observer.ttft
        if failure is None:
            outcome.usage, outcome.usage_tail = observer.usage()  # the tail is parsed after the answer
            return
        if stream is not None:
            await self._end_stream(exchange, stream, failure)
            return
        _, error = upstream_failure(failure, model=exchange.label, backend=backend.url, mid_body=True)
        outcome.status = 502
        if not is_sse:
            raise AnswerTruncated(error.message)
        if plan is not None:
            self._metrics.stream_failovers.labels(exchange.label, "unsupported").inc()
        # The status line is gone: tell an SSE client in-band, then end the stream cleanly.
        rest = observer.flush()
        separator = b"" if (rest or observer.last_sent).endswith((SEP, CRLF_SEP)) else SEP
        event = b"data: " + error_body(error.message, error.error_type, None, error.status) + b"\n\ndata: [DONE]\n\n"
        await exchange.finish(rest + separator + event)

    async def _end_stream(self, exchange: Exchange, stream: FailoverStream, failure: UpstreamError) -> None:
        """End a failover-capable stream its backends left unfinished: whole when only usage and [DONE] were
        missing, else with the backend's error event (or the gateway's) and [DONE]."""
        stream.flush()  # half an event of a backend that failed: nothing the client can use
        if stream.finished:
            await exchange.finish(stream.ending())
            exchange.outcome.usage = stream.usage
            self._metrics.stream_failovers.labels(exchange.label, "continued").inc()
            return
        exchange.outcome.status = 502
        if isinstance(failure, ErrorEvent):
            await exchange.finish(failure.event + DONE)
            return
        _, error = upstream_failure(failure, model=exchange.label, backend="", mid_body=True)
        event = b"data: " + error_body(error.message, error.error_type, None, error.status) + b"\n\n"
        await exchange.finish(event + DONE)

    def _count_failure(self, exchange: Exchange, failure: UpstreamError, backend: Backend) -> None:
        kind, _ = upstream_failure(failure, model=exchange.label, backend=backend.url, mid_body=True)
        self._metrics.upstream_errors.labels(backend.url, kind).inc()

    async def _copy(
        self,
        exchange: Exchange,
        content: UpstreamResponse,
        observer: ChunkObserver,
        learn_response_id: bool,
        backend: Backend,
        stream: FailoverStream | None,
    ) -> UpstreamError | None:
        """Copy the upstream body to the client; returns the upstream's failure, if it failed. A failover-capable
        stream that ends before its [DONE], or sends an error event, failed too: it is not finished here."""
        idle = self._idle_timeout
        send = exchange.send
        observe = self._observing(observer, learn_response_id, backend)
        try:
            while True:
                chunk = content.read_nowait()  # already buffered: no timer to arm
                if not chunk:
                    chunk = await content.readany(idle)
                    if not chunk:
                        break
                out = observe(chunk)
                if stream is not None and (stream.failure is not None or (content.at_eof() and not stream.done)):
                    if out:
                        await send({"type": "http.response.body", "body": out, "more_body": True})
                    return stream.failure or BodyBroken("the stream ended before [DONE]")
                if content.at_eof():  # the last chunk ends the response: one send instead of two
                    await exchange.finish(out + observer.flush())
                    return None
                if out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
        except UpstreamError as exc:
            if stream is None or not stream.done:
                return exc
            # the stream's [DONE] came: whatever broke after it, the client has all of it
        return await self._ended(exchange, observer, stream)

    async def _pump(
        self,
        cycle: Cycle,
        exchange: Exchange,
        content: UpstreamResponse,
        observer: ChunkObserver,
        learn_response_id: bool,
        backend: Backend,
        stream: FailoverStream | None,
    ) -> UpstreamError | None:
        """`_copy`, with each chunk passed on by the upstream connection's callback as it arrives."""
        observe = self._observing(observer, learn_response_id, backend)
        failure: UpstreamError | None = None

        def chunk_came(chunk: bytes) -> None:
            nonlocal failure
            if cycle.disconnected:  # the client left (this task is being cancelled): nothing of it reaches them,
                return  # so nothing of it may count as sent (a [DONE] here would pass for a delivered answer)
            out = observe(chunk)
            if out and not cycle.write_chunk(out):  # the client's window is full: the backend waits for it
                content.hold()
                cycle.drained().add_done_callback(lambda _: content.release())
            if stream is not None and stream.failure is not None:
                failure = stream.failure
                content.stop()

        try:
            await content.pump(chunk_came, self._idle_timeout)
        except UpstreamError as exc:
            if stream is None or not stream.done:
                return exc
            # the stream's [DONE] came: whatever broke after it, the client has all of it
        return failure or await self._ended(exchange, observer, stream)

    def _observing(
        self, observer: ChunkObserver, learn_response_id: bool, backend: Backend
    ) -> Callable[[bytes], bytes]:
        """What each upstream chunk goes through on its way (returns the bytes for the client): the observer
        and, for a Responses API answer, its id learned from the first chunk."""
        if not learn_response_id:
            return observer.feed  # every token of every stream: no frame in between

        def observe(chunk: bytes) -> bytes:
            nonlocal learn_response_id
            if learn_response_id:
                self._responses.learn(chunk, backend)
                learn_response_id = False
            return observer.feed(chunk)

        return observe

    async def _ended(
        self, exchange: Exchange, observer: ChunkObserver, stream: FailoverStream | None
    ) -> UpstreamError | None:
        """The body ended: a failover-capable stream without its [DONE] failed, anything else is finished."""
        if stream is not None and not stream.done:
            return BodyBroken("the stream ended before [DONE]")
        await exchange.finish(observer.flush())
        return None
