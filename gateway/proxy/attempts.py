"""The second stage: admission, then one backend after another until one answers, then the relay.

A request waits for an admission slot and holds it until its answer ends. It is sent again to another backend
of its model only while nothing has reached the client: when the connection fails (connect refused, reset
before a response byte) or the backend answers a status from `retries.on_status`. Retries are bounded per
request (`retries.max_retries`) and overall (the retry budget), and every outcome feeds passive health.

A failover-capable stream whose backend fails mid-stream is continued on another backend (`_Continuations`),
at most `failover.max_attempts` times, each continuation spending from the same retry budget.
"""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry.trace import Span, SpanKind

from gateway.errors import ConnectFailed, HeadTimeout, NoHealthyBackend, Unanswered, UpstreamError, upstream_failure
from gateway.fleet.registry import Backend
from gateway.loop_series import GaugeChild
from gateway.metrics import Metrics
from gateway.proxy.exchange import Exchange
from gateway.proxy.failover import COMPLETIONS_TARGET, continuation_body, inject_return_token_ids, max_model_len
from gateway.proxy.failover_stream import FailoverStream
from gateway.proxy.headers import upstream_headers
from gateway.proxy.interfaces import AdmissionGate, BackendDirectory, BackendFeedback, Picker
from gateway.proxy.relay import SSE, Relay
from gateway.proxy.upstream import UpstreamPool, UpstreamResponse
from gateway.proxy.usage import inject_include_usage
from gateway.routing.request import RequestInfo
from gateway.routing.retry_budget import RetryBudget
from gateway.settings import Settings
from gateway.tracing import (
    ATTEMPT,
    BACKEND,
    HTTP_STATUS,
    POLICY,
    PREDICTED_CACHED,
    QUEUED,
    SERVER_ADDRESS,
    TRACE_HEADERS,
    URL_FULL,
    Tracing,
    fail,
)


class Attempts:
    def __init__(
        self,
        settings: Settings,
        picker: Picker,
        gate: AdmissionGate,
        feedback: BackendFeedback,
        pool: UpstreamPool,
        relay: Relay,
        metrics: Metrics,
        directory: BackendDirectory,
        tracing: Tracing,
    ) -> None:
        self._picker = picker
        self._gate = gate
        self._feedback = feedback
        self._pool = pool
        self._relay = relay
        self._metrics = metrics
        self._directory = directory
        self._tracing = tracing
        self._policy = settings.routing.policy
        self._first_byte_timeout = settings.timeouts.first_byte
        self._max_retries = settings.retries.max_retries
        self._retry_statuses = frozenset(settings.retries.on_status)
        self._budget = RetryBudget(settings.retries.budget_ratio, settings.retries.budget_reserve)
        self._max_failovers = settings.failover.max_attempts
        self._retry_after = settings.retry_after

    async def run(self, exchange: Exchange) -> None:
        info = exchange.info
        gate = self._gate
        routing = None  # the span of admission and the first pick, when tracing
        if exchange.span is not None:
            routing = self._tracing.child(exchange.span, "switchyard.route", SpanKind.INTERNAL, {POLICY: self._policy})
        queued = False
        try:
            if not gate.try_enter(info):
                queued = True
                if routing is not None:
                    routing.set_attribute(QUEUED, True)
                await gate.enter(info)
        except BaseException as exc:
            if routing is not None:
                fail(routing, type(exc).__name__, str(exc))
                routing.end()
            raise
        try:
            if queued:  # backends may have left, drained or gone down while it waited
                exchange.candidates = self._still_routable(exchange)
            await self._attempts(exchange, routing)
        finally:
            gate.leave(info.model)
            if routing is not None and routing.is_recording():
                routing.end()  # the request ended before its first pick

    def _still_routable(self, exchange: Exchange) -> Sequence[Backend]:
        """The request's candidates that may still take it (as the registry has them now), or NoHealthyBackend."""
        now = {backend.url: backend for backend in self._directory.candidates(exchange.info.model)}
        kept = [now[backend.url] for backend in exchange.candidates if backend.url in now]
        if not kept:
            raise NoHealthyBackend.for_model(exchange.info.model, self._retry_after)
        return kept

    async def _attempts(self, exchange: Exchange, routing: Span | None) -> None:
        info = exchange.info
        outcome = exchange.outcome
        model = info.model
        body = exchange.body
        if exchange.hide_usage:
            assert info.payload is not None
            body = inject_include_usage(body, info.payload)
        plan = exchange.failover
        if plan is not None and plan.capable:
            body = inject_return_token_ids(body)
        scope = exchange.scope
        headers = upstream_headers(scope, outcome.request_id)
        if exchange.span is not None:  # each attempt's own context replaces the client's
            headers = [item for item in headers if item[0] not in TRACE_HEADERS]
        path = scope["raw_path"] or scope["path"].encode()
        query = scope["query_string"]
        target = path + b"?" + query if query else path
        method = scope["method"].encode()
        self._budget.deposit()
        candidates = exchange.candidates
        info = outcome.info = await self._picker.prepare(info, candidates)
        tried: list[Backend] = []
        pool: Sequence[Backend] = candidates
        errors = self._metrics.upstream_errors
        while True:
            held = self._hold(exchange, self._picker.pick(pool, info), target)
            backend = held.backend
            outcome.backend = backend.url
            outcome.predicted_cached = self._picker.predicted_cached(info, backend)
            if routing is not None:
                routing.set_attribute(BACKEND, backend.url)
                if outcome.predicted_cached is not None:
                    routing.set_attribute(PREDICTED_CACHED, outcome.predicted_cached)
                routing.end()
                routing = None
            continuations = None
            try:
                try:
                    response = await self._pool.request(
                        backend.url, method, target, held.headers(headers, backend), body, self._first_byte_timeout
                    )
                except UpstreamError as exc:
                    kind, error = upstream_failure(exc, model=model, backend=backend.url)
                    errors.labels(backend.url, kind).inc()
                    held.failed(kind, str(exc))
                    if isinstance(exc, ConnectFailed | Unanswered | HeadTimeout):
                        self._feedback.failure(backend)
                    if not isinstance(exc, ConnectFailed | Unanswered):  # nothing reached the client: retried
                        raise error from None
                    tried.append(backend)
                    pool = self._retry_pool(candidates, tried)
                    if not pool:
                        raise error from None
                    outcome.retries += 1
                    continue
                held.answered(response.status)
                continuable = plan is not None and plan.capable and response.status == 200
                if response.status >= 500:
                    self._feedback.failure(backend)
                elif not continuable:  # a stream that may fail over is judged by how it ends
                    self._feedback.success(backend)
                retryable = response.status in self._retry_statuses
                if retryable or response.status >= 500:  # every failed answer, retried or passed on
                    errors.labels(backend.url, "status").inc()
                if retryable:
                    tried.append(backend)
                    pool = self._retry_pool(candidates, tried)
                    if pool:
                        response.close()
                        outcome.retries += 1
                        continue
                outcome.status = response.status
                if continuable:
                    continuations = _Continuations(self, exchange, held, headers, (target, body), tried)
                await self._relay.relay(exchange, response, backend, continuations)
                if continuations is not None and not continuations.taken_over:
                    self._feedback.success(backend)
                return
            finally:
                held.release()
                if continuations is not None:
                    continuations.release()

    def _hold(self, exchange: Exchange, backend: Backend, target: bytes) -> _Held:
        """`backend` held for one upstream request of `exchange`, with that attempt's span when tracing."""
        exchange.attempts += 1
        span = None
        if exchange.span is not None:
            span = self._tracing.child(
                exchange.span,
                f"POST {exchange.route}",
                SpanKind.CLIENT,
                {
                    SERVER_ADDRESS: backend.url,
                    URL_FULL: backend.url + target.decode("latin-1"),
                    ATTEMPT: exchange.attempts,
                },
            )
        return _Held(self._picker, exchange.info, backend, self._metrics, self._tracing, span)

    def _retry_pool(self, candidates: Sequence[Backend], tried: list[Backend]) -> list[Backend]:
        """Backends left for one more try, or none when out of candidates, retries or budget."""
        if len(tried) > self._max_retries:
            return []
        pool = [backend for backend in candidates if backend not in tried]
        if pool and not self._budget.try_spend():
            return []
        return pool


class _Held:
    """A backend one request holds for one upstream request: counted in flight (the picker's count and the
    gauge) until released, once; with tracing, that attempt's client span, ended on release."""

    __slots__ = ("_gauge", "_info", "_picker", "_span", "_tracing", "backend")

    def __init__(
        self,
        picker: Picker,
        info: RequestInfo,
        backend: Backend,
        metrics: Metrics,
        tracing: Tracing,
        span: Span | None,
    ) -> None:
        self._picker = picker
        self._info = info
        self.backend = backend
        self._gauge: GaugeChild | None = metrics.inflight_gauge(info.model, backend.url)
        self._gauge.inc()
        self._tracing = tracing
        self._span = span

    def headers(self, headers: list[tuple[bytes, bytes]], backend: Backend) -> list[tuple[bytes, bytes]]:
        """The upstream request's headers: the backend's own key, and this attempt's trace context (so the
        backend's span is its child)."""
        if backend.api_key:
            headers = [*headers, (b"authorization", b"Bearer " + backend.api_key.encode("latin-1"))]
        if self._span is None:
            return headers
        return headers + self._tracing.context_headers(self._span)

    def answered(self, status: int) -> None:
        if self._span is not None:
            self._span.set_attribute(HTTP_STATUS, status)
            if status >= 400:
                fail(self._span, str(status), f"answered {status}")

    def failed(self, error_type: str, message: str) -> None:
        if self._span is not None:
            fail(self._span, error_type, message)

    def release(self) -> None:
        gauge = self._gauge
        if gauge is not None:
            self._gauge = None
            self._picker.release(self.backend, self._info)
            gauge.dec()
            if self._span is not None:
                self._span.end()


class _Continuations:
    """The takeover of one failover-capable stream (relay.Takeover): when its backend fails, the same stream
    goes on from another backend of the model, at most `failover.max_attempts` times and within the retry budget;
    the failed backend gets the passive-health treatment of any failure."""

    def __init__(
        self,
        attempts: Attempts,
        exchange: Exchange,
        held: _Held,
        headers: list[tuple[bytes, bytes]],
        original: tuple[bytes, bytes],
        tried: list[Backend],
    ) -> None:
        self._attempts = attempts
        self._exchange = exchange
        self._held = held
        self._headers = headers
        self._original = original  # target and body of the request as first sent
        self._tried = list(tried)  # backends this request failed on (connect errors before the stream began)
        self._count = 0
        self.taken_over = False  # the first backend failed the stream

    def release(self) -> None:
        self._held.release()

    async def __call__(
        self, failure: UpstreamError, backend: Backend, stream: FailoverStream
    ) -> tuple[UpstreamResponse, Backend] | None:
        attempts = self._attempts
        exchange = self._exchange
        model = exchange.info.model
        self.taken_over = True
        attempts._feedback.failure(backend)
        kind, _ = upstream_failure(failure, model=model, backend=backend.url, mid_body=True)
        self._held.failed(kind, str(failure))
        self._held.release()  # the failed backend is no longer counted busy with this stream
        self._tried.append(backend)
        if stream.finished:
            return None  # only usage and [DONE] were missing: the relay ends the stream itself
        if stream.refusal() is not None:
            self._record("unsupported")
            return None
        sent = False  # a continuation request went out
        while True:
            if self._count >= attempts._max_failovers:
                self._record("failed" if sent else "exhausted")
                return None
            pool = [other for other in attempts._directory.candidates(model) if other not in self._tried]
            if not pool:
                self._record("failed" if sent else "no_backend")
                return None
            if not attempts._budget.try_spend():
                self._record("exhausted")
                return None
            backend = attempts._picker.pick(pool, exchange.info)
            self._tried.append(backend)
            request = self._request(stream, backend)
            if request is None:
                self._record("unsupported")
                return None
            target, body = request
            self._held = attempts._hold(exchange, backend, target)
            try:
                response = await attempts._pool.request(
                    backend.url,
                    b"POST",
                    target,
                    self._held.headers(self._headers, backend),
                    body,
                    attempts._first_byte_timeout,
                )
            except UpstreamError as exc:
                kind, _ = upstream_failure(exc, model=model, backend=backend.url)
                attempts._metrics.upstream_errors.labels(backend.url, kind).inc()
                self._held.failed(kind, str(exc))
                self._held.release()
                if isinstance(exc, ConnectFailed | Unanswered | HeadTimeout):
                    attempts._feedback.failure(backend)
                if not isinstance(exc, ConnectFailed):  # it went out: one attempt used
                    self._count += 1
                    sent = True
                continue
            self._count += 1
            sent = True
            self._held.answered(response.status)
            if response.status >= 500:
                attempts._feedback.failure(backend)
            else:
                attempts._feedback.success(backend)
            if response.status != 200 or response.content_type != SSE:
                attempts._metrics.upstream_errors.labels(backend.url, "status").inc()
                response.close()
                self._held.release()
                continue
            exchange.outcome.failovers += 1
            exchange.outcome.backend = backend.url  # the access log and the metrics name who finished the answer
            attempts._metrics.stream_failovers.labels(exchange.label, "continued").inc()
            if stream.started:
                stream.continue_from_here(translate=stream.plan.chat)
            else:
                stream.resend()
            return response, backend

    def _request(self, stream: FailoverStream, backend: Backend) -> tuple[bytes, bytes] | None:
        """Target and body of the request that goes on with the stream on `backend`."""
        if not stream.started:
            return self._original  # nothing reached the client: the same request again
        info = self._exchange.info
        assert info.payload is not None
        body = continuation_body(
            info.payload,
            stream.plan.chat,
            stream.token_ids(),
            stream.generated,
            max_model_len(backend.models, info.model),
        )
        return None if body is None else (COMPLETIONS_TARGET, body)

    def _record(self, outcome: str) -> None:
        self._attempts._metrics.stream_failovers.labels(self._exchange.label, outcome).inc()
