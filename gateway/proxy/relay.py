"""The last stage: the backend's answer to the client, each chunk as soon as it is read.

Reading pauses while the client is slow (uvicorn's flow control on one side, the pool's on the other), and
the idle timer runs only while the proxy waits on the backend. When the backend fails after the status line
went out, an SSE client is told in-band (an error event, then `[DONE]`); any other answer is cut off, so
that it cannot pass for a complete one.
"""

from __future__ import annotations

from gateway.errors import AnswerTruncated, UpstreamError, error_body, upstream_failure
from gateway.fleet.registry import Backend
from gateway.metrics import Metrics
from gateway.proxy.exchange import Exchange
from gateway.proxy.gatekeeper import RESPONSES_ROUTE
from gateway.proxy.headers import DROP_RESPONSE_HEADERS, DROP_RESPONSE_HEADERS_AND_LENGTH
from gateway.proxy.interfaces import Picker
from gateway.proxy.responses_api import ResponseDirectory
from gateway.proxy.stream_observer import ChunkObserver
from gateway.proxy.upstream import UpstreamResponse

SSE = b"text/event-stream"


class Relay:
    def __init__(self, metrics: Metrics, idle_timeout: float, responses: ResponseDirectory, picker: Picker) -> None:
        self._metrics = metrics
        self._idle_timeout = idle_timeout
        self._responses = responses
        self._picker = picker

    async def relay(self, exchange: Exchange, response: UpstreamResponse, backend: Backend) -> None:
        outcome = exchange.outcome
        is_sse = response.content_type == SSE
        hide_usage = exchange.hide_usage and is_sse
        # Hiding the usage event shortens the body: a length the backend declared would no longer hold.
        drop = DROP_RESPONSE_HEADERS_AND_LENGTH if hide_usage else DROP_RESPONSE_HEADERS
        headers = [(name, value) for name, value in response.raw_headers if name.lower() not in drop]
        headers.append((b"x-request-id", outcome.request_id))
        headers += outcome.extra_headers
        observer = ChunkObserver(is_sse, hide_usage, outcome.started, self._metrics.model_series(exchange.label).itl)
        learn_response_id = exchange.route == RESPONSES_ROUTE and response.status == 200
        try:
            await exchange.send({"type": "http.response.start", "status": response.status, "headers": headers})
            failure = await self._copy(exchange, response, observer, learn_response_id, backend)
        finally:
            response.close()  # no-op once released; drops the upstream connection when cut short
            outcome.ttft = observer.ttft
        if failure is None:
            outcome.usage = observer.usage()
            return
        kind, error = upstream_failure(failure, model=exchange.label, backend=backend.url, mid_body=True)
        outcome.status = 502
        self._metrics.upstream_errors.labels(backend.url, kind).inc()
        if not is_sse:
            raise AnswerTruncated(error.message)
        # The status line is gone: tell an SSE client in-band, then end the stream cleanly.
        rest = observer.flush()
        separator = b"" if (rest or observer.sent_tail).endswith(b"\n\n") else b"\n\n"
        event = b"data: " + error_body(error.message, error.error_type, None, error.status) + b"\n\ndata: [DONE]\n\n"
        await exchange.finish(rest + separator + event)

    async def _copy(
        self,
        exchange: Exchange,
        content: UpstreamResponse,
        observer: ChunkObserver,
        learn_response_id: bool,
        backend: Backend,
    ) -> UpstreamError | None:
        """Copy the upstream body to the client; returns the upstream's failure, if it failed."""
        idle = self._idle_timeout
        send = exchange.send
        waiting_first_token = observer.sse
        try:
            while True:
                chunk = content.read_nowait()  # already buffered: no timer to arm
                if not chunk:
                    chunk = await content.readany(idle)
                    if not chunk:
                        break
                if learn_response_id:
                    self._responses.learn(chunk, backend)
                    learn_response_id = False
                out = observer.feed(chunk)
                if waiting_first_token and observer.ttft is not None:
                    waiting_first_token = False
                    self._picker.discharge(exchange.info)  # its prefill is done
                if content.at_eof():  # the last chunk ends the response: one send instead of two
                    await exchange.finish(out + observer.flush())
                    return None
                if out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
        except UpstreamError as exc:
            return exc
        await exchange.finish(observer.flush())
        return None
