"""The hot path: route one request by model, forward its bytes, relay the answer as it arrives.

Pure ASGI on purpose: the request body is read once and forwarded as received, each upstream chunk is
written to the client as soon as it is read (backpressure flows both ways through uvicorn's flow control
and the upstream pool's), and a client disconnect cancels the upstream request at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from time import perf_counter

import aiohttp

from gateway.asgi import Receive, Scope, Send, send_bytes
from gateway.errors import (
    GatewayError,
    HeadersTooLarge,
    ModelNotFound,
    ModelRequired,
    NoHealthyBackend,
    RateLimited,
    ResponseNotFound,
    UpstreamTimeout,
    UpstreamUnavailable,
    error_body,
    error_parts,
)
from gateway.fleet.health import OutlierDetector
from gateway.fleet.registry import Backend, Registry
from gateway.metrics import NO_MODEL, UNKNOWN_MODEL, Metrics
from gateway.proxy.disconnect import DisconnectWatch
from gateway.proxy.headers import (
    DROP_RESPONSE_HEADERS,
    DROP_RESPONSE_HEADERS_AND_LENGTH,
    client_host,
    header_map,
    request_id,
    upstream_headers,
)
from gateway.proxy.outcome import Outcome, Recorder
from gateway.proxy.request_body import BodyKind, ClientDisconnected, header, read_body, routing_fields
from gateway.proxy.responses_api import ResponseDirectory
from gateway.proxy.stream_observer import ChunkObserver
from gateway.proxy.upstream import (
    ConnectFailed,
    HeadTimeout,
    IdleTimeout,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
)
from gateway.proxy.usage import inject_include_usage, wants_usage_injection
from gateway.routing.admission import Admission
from gateway.routing.policies import Policy, RequestInfo
from gateway.routing.retry_budget import RetryBudget
from gateway.settings import Settings
from gateway.tenancy.auth import KeyRing, Principal

RESPONSES_ROUTE = "/v1/responses"
CLIENT_CLOSED = 499  # nginx's code for "client closed the request", used in metrics only


class RetryableUpstreamError(Exception):
    """The backend failed before sending anything; another backend of the model may take the request."""


class UpstreamBrokeMidBody(Exception):
    """A non-stream answer broke after its headers went out: the connection must be dropped so the
    client sees a truncated response rather than a silently short one."""


class Proxy:
    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        policy: Policy,
        admission: Admission,
        outliers: OutlierDetector,
        keys: KeyRing,
        metrics: Metrics,
    ) -> None:
        self._settings = settings
        self._outliers = outliers
        self._registry = registry
        self._policy = policy
        self._admission = admission
        self._metrics = metrics
        self._session: aiohttp.ClientSession | None = None
        self._pool: UpstreamPool | None = None
        self._first_byte_timeout = settings.timeouts.first_byte
        self._idle_timeout = settings.timeouts.idle
        self._retry_statuses = frozenset(settings.retries.on_status)
        self._budget = RetryBudget(settings.retries.budget_ratio)
        self._recorder = Recorder(metrics, settings.access_log)
        self._keys = keys
        self._limits = settings.limits
        self._responses = ResponseDirectory()

    def attach(self, session: aiohttp.ClientSession | None, pool: UpstreamPool | None) -> None:
        """Give the proxy the lifespan-owned clients (None when the lifespan ends): the pool relays requests,
        the session asks backends about Responses API ids."""
        self._session = session
        self._pool = pool

    async def handle(self, scope: Scope, receive: Receive, send: Send, route: str, kind: BodyKind) -> None:
        outcome = Outcome(request_id=request_id(scope), started=perf_counter())
        model_label = NO_MODEL
        principal: Principal | None = None
        try:
            self._check_headers(scope)
            if self._keys.enabled:
                principal = self._keys.authenticate(scope)
            body = await read_body(scope, receive, self._settings.max_body_bytes, self._limits.body_timeout)
            fields = routing_fields(kind, body, header(scope, b"content-type"), self._limits.max_json_depth)
            model_label = UNKNOWN_MODEL
            if kind is BodyKind.RESPONSE_ID:
                candidates = await self._response_owner(scope["path_params"]["response_id"])
                model = _base_model(candidates[0])
            else:
                model = self._resolve_model(fields.model, principal)
                candidates = self._registry.candidates(model)
            model_label = model
            if principal is not None:
                outcome.extra_headers = principal.admit()
            if not candidates:
                raise NoHealthyBackend(
                    f"No healthy backend serves the model `{model}` right now.",
                    headers={"Retry-After": str(self._settings.retry_after)},
                )
            previous = fields.payload.get("previous_response_id") if fields.payload else None
            if isinstance(previous, str) and route == RESPONSES_ROUTE:
                candidates = await self._response_owner(previous, candidates)
            outcome.info = RequestInfo(
                model=model,
                route=route,
                payload=fields.payload,
                headers=header_map(scope),
                tenant=principal.name if principal else client_host(scope),
            )
            await self._relay(scope, receive, send, body, candidates, outcome)
        except RateLimited as exc:
            self._metrics.rejected.labels(model_label, "rate_limit").inc()
            outcome.status = await self._send_error(send, exc, outcome.request_id)
        except GatewayError as exc:
            outcome.status = await self._send_error(send, exc, outcome.request_id)
        except ClientDisconnected:
            outcome.status = CLIENT_CLOSED
        except UpstreamBrokeMidBody:
            outcome.status = 502
            raise
        finally:
            if principal is not None and outcome.usage is not None:
                principal.charge_tokens(outcome.usage.prompt_tokens + outcome.usage.completion_tokens)
            self._recorder.record(model_label, route, outcome, perf_counter() - outcome.started)

    async def _response_owner(self, response_id: str, candidates: Sequence[Backend] | None = None) -> Sequence[Backend]:
        """The one backend holding a Responses API response, or ResponseNotFound."""
        session = self._session
        pool = self._registry.routable_backends() if candidates is None else candidates
        owner = None if session is None else await self._responses.locate(response_id, pool, session)
        if owner is None:
            raise ResponseNotFound(f"Response with id '{response_id}' not found.", param="response_id")
        return (owner,)

    async def _send_error(self, send: Send, error: GatewayError, request_id: bytes) -> int:
        status, headers, payload = error_parts(error)
        headers.append((b"x-request-id", request_id))
        await send_bytes(send, status, payload, headers)
        return status

    def _check_headers(self, scope: Scope) -> None:
        headers = scope["headers"]
        if len(headers) > self._limits.max_header_count:
            raise HeadersTooLarge(f"The request has more than {self._limits.max_header_count} headers.")
        if sum(len(name) + len(value) for name, value in headers) > self._limits.max_header_bytes:
            raise HeadersTooLarge(f"The request headers exceed {self._limits.max_header_bytes} bytes.")

    def _resolve_model(self, model: str | None, principal: Principal | None) -> str:
        if model is None:
            served = self._registry.served_models()
            if principal is not None:
                served = [name for name in served if principal.may_use(name)]
            if len(served) == 1:
                return served[0]
            if not served:
                raise NoHealthyBackend(
                    "No backend serves any model right now.",
                    headers={"Retry-After": str(self._settings.retry_after)},
                )
            raise ModelRequired(f"`model` is required: this gateway serves {len(served)} models.", param="model")
        if self._registry.is_known(model) and (principal is None or principal.may_use(model)):
            return model
        raise ModelNotFound(model)  # also for a model the key may not use: its existence is not revealed

    async def _relay(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        body: bytes,
        candidates: Sequence[Backend],
        outcome: Outcome,
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        watch = DisconnectWatch(receive, task)
        admission = self._admission
        info = outcome.info
        try:
            if not admission.try_enter(info):
                await admission.enter(info)
            try:
                await self._attempts(scope, send, body, candidates, watch, outcome)
            finally:
                admission.leave(info.model)
        except asyncio.CancelledError:
            if watch.disconnected:
                task.uncancel()
                outcome.status = CLIENT_CLOSED
                return
            raise
        finally:
            watch.stop()

    async def _attempts(
        self,
        scope: Scope,
        send: Send,
        body: bytes,
        candidates: Sequence[Backend],
        watch: DisconnectWatch,
        outcome: Outcome,
    ) -> None:
        info = outcome.info
        model = info.model
        hide_usage = wants_usage_injection(info.route, info.payload)
        if hide_usage:
            assert info.payload is not None
            body = inject_include_usage(body, info.payload)
        headers = upstream_headers(scope, outcome.request_id)
        path = scope["raw_path"] or scope["path"].encode()
        query = scope["query_string"]
        target = path + b"?" + query if query else path
        method = scope["method"].encode()
        self._budget.deposit()
        tried: list[Backend] = []
        pool = candidates
        while True:
            backend = self._policy.pick(pool, info)
            backend.inflight += 1  # same step as the pick: no await in between
            gauge = self._metrics.inflight_gauge(model, backend.url)
            gauge.inc()
            outcome.backend = backend.url
            try:
                try:
                    response = await self._open(backend, method, target, headers, body)
                except RetryableUpstreamError as exc:
                    self._outliers.failure(backend)
                    tried.append(backend)
                    pool = self._retry_pool(candidates, tried)
                    if not pool:
                        raise UpstreamUnavailable(f"No backend of model `{model}` could be reached ({exc}).") from None
                    outcome.retries += 1
                    continue
                except UpstreamTimeout:
                    self._outliers.failure(backend)
                    raise
                if response.status >= 500:
                    self._outliers.failure(backend)
                else:
                    self._outliers.success(backend)
                if response.status in self._retry_statuses:
                    self._metrics.upstream_errors.labels(backend.url, "status").inc()
                    tried.append(backend)
                    pool = self._retry_pool(candidates, tried)
                    if pool:
                        response.close()
                        outcome.retries += 1
                        continue
                outcome.status = response.status
                await self._stream(response, send, backend, watch, outcome, hide_usage)
                return
            finally:
                backend.inflight -= 1
                gauge.dec()

    def _retry_pool(self, candidates: Sequence[Backend], tried: list[Backend]) -> list[Backend]:
        """Backends left for one more try, or none when out of candidates, retries or budget."""
        if len(tried) > self._settings.retries.max_retries:
            return []
        pool = [backend for backend in candidates if backend not in tried]
        if pool and not self._budget.try_spend():
            return []
        return pool

    async def _open(
        self, backend: Backend, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> UpstreamResponse:
        pool = self._pool
        if pool is None:
            raise UpstreamUnavailable("The gateway is shutting down.")
        if backend.api_key:
            headers = [*headers, (b"authorization", b"Bearer " + backend.api_key.encode("latin-1"))]
        errors = self._metrics.upstream_errors
        try:
            return await pool.request(backend.url, method, target, headers, body, self._first_byte_timeout)
        except ConnectFailed as exc:
            errors.labels(backend.url, "connect").inc()
            raise RetryableUpstreamError(f"{backend.url}: {exc}") from None
        except HeadTimeout:
            errors.labels(backend.url, "timeout").inc()
            raise UpstreamTimeout(f"The backend did not answer within {self._first_byte_timeout:g} s.") from None
        except UpstreamError as exc:
            errors.labels(backend.url, "protocol").inc()
            raise UpstreamUnavailable(f"The backend failed: {exc}") from None

    async def _stream(
        self,
        response: UpstreamResponse,
        send: Send,
        backend: Backend,
        watch: DisconnectWatch,
        outcome: Outcome,
        hide_usage: bool,
    ) -> None:
        is_sse = response.content_type == b"text/event-stream"
        # Hiding the usage event shortens the body: a length the backend declared would no longer hold.
        drop = DROP_RESPONSE_HEADERS_AND_LENGTH if hide_usage and is_sse else DROP_RESPONSE_HEADERS
        headers = [(name, value) for name, value in response.raw_headers if name.lower() not in drop]
        headers.append((b"x-request-id", outcome.request_id))
        headers += outcome.extra_headers
        observer = ChunkObserver(
            is_sse, hide_usage, outcome.started, self._metrics.model_series(outcome.info.model).itl
        )
        learn_response_id = outcome.info.route == RESPONSES_ROUTE and response.status == 200
        try:
            await send({"type": "http.response.start", "status": response.status, "headers": headers})
            failure = await self._relay_body(response, send, observer, watch, learn_response_id, backend)
        finally:
            response.close()  # no-op once released; drops the upstream connection when cut short
            outcome.ttft = observer.ttft
        if failure is None:
            outcome.usage = observer.usage()
            return
        message, kind = failure
        outcome.status = 502
        self._metrics.upstream_errors.labels(backend.url, kind).inc()
        if not is_sse:
            raise UpstreamBrokeMidBody(message)
        # The status line is gone: tell an SSE client in-band, then end the stream cleanly.
        watch.finishing = True
        rest = observer.flush()
        separator = b"" if (rest or observer.sent_tail).endswith(b"\n\n") else b"\n\n"
        event = b"data: " + error_body(message, "bad_gateway", None, 502) + b"\n\ndata: [DONE]\n\n"
        await send({"type": "http.response.body", "body": rest + separator + event, "more_body": False})

    async def _relay_body(
        self,
        content: UpstreamResponse,
        send: Send,
        observer: ChunkObserver,
        watch: DisconnectWatch,
        learn_response_id: bool,
        backend: Backend,
    ) -> tuple[str, str] | None:
        """Copy the upstream body to the client; returns (message, kind) if the upstream failed."""
        idle = self._idle_timeout
        try:
            while True:
                chunk = content.read_nowait()  # already buffered: no timer to arm
                if not chunk:
                    # the idle timer runs only while waiting on the backend: a slow client is not an idle upstream
                    chunk = await content.readany(idle)
                    if not chunk:
                        break
                if learn_response_id:
                    self._responses.learn(chunk, backend)
                    learn_response_id = False
                out = observer.feed(chunk)
                if content.at_eof():  # the last chunk ends the response: one send instead of two
                    watch.finishing = True
                    await send({"type": "http.response.body", "body": out + observer.flush(), "more_body": False})
                    return None
                if out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
        except IdleTimeout:
            return f"The backend sent nothing for {idle:g} s.", "idle_timeout"
        except UpstreamError as exc:
            return f"The backend connection broke: {exc}.", "disconnect"
        watch.finishing = True
        await send({"type": "http.response.body", "body": observer.flush(), "more_body": False})
        return None


def _base_model(backend: Backend) -> str:
    """The backend's base model (the card without a parent), for metric labels."""
    return next((name for name, card in backend.models.items() if not card.get("parent")), UNKNOWN_MODEL)
