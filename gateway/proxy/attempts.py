"""The second stage: admission, then one backend after another until one answers, then the relay.

A request waits for an admission slot and holds it until its answer ends. It is sent again to another backend
of its model only while nothing has reached the client: when the connection fails (connect refused, reset
before a response byte) or the backend answers a status from `retries.on_status`. Retries are bounded per
request (`retries.max_retries`) and overall (the retry budget), and every outcome feeds passive health.
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.errors import ConnectFailed, HeadTimeout, UpstreamError, upstream_failure
from gateway.fleet.registry import Backend
from gateway.metrics import Metrics
from gateway.proxy.exchange import Exchange
from gateway.proxy.headers import upstream_headers
from gateway.proxy.interfaces import AdmissionGate, BackendFeedback, Picker
from gateway.proxy.relay import Relay
from gateway.proxy.upstream import UpstreamPool, UpstreamResponse
from gateway.proxy.usage import inject_include_usage
from gateway.routing.retry_budget import RetryBudget
from gateway.settings import Settings


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
    ) -> None:
        self._picker = picker
        self._gate = gate
        self._feedback = feedback
        self._pool = pool
        self._relay = relay
        self._metrics = metrics
        self._first_byte_timeout = settings.timeouts.first_byte
        self._max_retries = settings.retries.max_retries
        self._retry_statuses = frozenset(settings.retries.on_status)
        self._budget = RetryBudget(settings.retries.budget_ratio)

    async def run(self, exchange: Exchange) -> None:
        info = exchange.info
        gate = self._gate
        if not gate.try_enter(info):
            await gate.enter(info)
        try:
            await self._attempts(exchange)
        finally:
            gate.leave(info.model)

    async def _attempts(self, exchange: Exchange) -> None:
        info = exchange.info
        outcome = exchange.outcome
        model = info.model
        body = exchange.body
        if exchange.hide_usage:
            assert info.payload is not None
            body = inject_include_usage(body, info.payload)
        scope = exchange.scope
        headers = upstream_headers(scope, outcome.request_id)
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
            backend = self._picker.pick(pool, info)
            gauge = self._metrics.inflight_gauge(model, backend.url)
            gauge.inc()
            outcome.backend = backend.url
            outcome.predicted_cached = self._picker.predicted_cached(info, backend)
            try:
                try:
                    response = await self._open(backend, method, target, headers, body)
                except UpstreamError as exc:
                    kind, error = upstream_failure(exc, model=model, backend=backend.url)
                    errors.labels(backend.url, kind).inc()
                    if isinstance(exc, ConnectFailed | HeadTimeout):
                        self._feedback.failure(backend)
                    if not isinstance(exc, ConnectFailed):
                        raise error from None
                    tried.append(backend)
                    pool = self._retry_pool(candidates, tried)
                    if not pool:
                        raise error from None
                    outcome.retries += 1
                    continue
                if response.status >= 500:
                    self._feedback.failure(backend)
                else:
                    self._feedback.success(backend)
                if response.status in self._retry_statuses:
                    errors.labels(backend.url, "status").inc()
                    tried.append(backend)
                    pool = self._retry_pool(candidates, tried)
                    if pool:
                        response.close()
                        outcome.retries += 1
                        continue
                outcome.status = response.status
                await self._relay.relay(exchange, response, backend)
                if outcome.usage is not None:
                    self._picker.observe(info, outcome.usage.prompt_tokens)
                return
            finally:
                self._picker.release(backend, info)
                gauge.dec()

    def _retry_pool(self, candidates: Sequence[Backend], tried: list[Backend]) -> list[Backend]:
        """Backends left for one more try, or none when out of candidates, retries or budget."""
        if len(tried) > self._max_retries:
            return []
        pool = [backend for backend in candidates if backend not in tried]
        if pool and not self._budget.try_spend():
            return []
        return pool

    async def _open(
        self, backend: Backend, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> UpstreamResponse:
        if backend.api_key:
            headers = [*headers, (b"authorization", b"Bearer " + backend.api_key.encode("latin-1"))]
        return await self._pool.request(backend.url, method, target, headers, body, self._first_byte_timeout)
