"""The hot path: route one request by model, forward its bytes, relay the answer as it arrives.

Pure ASGI on purpose: the request body is read once and forwarded as received, each upstream chunk is
written to the client as soon as it is read (backpressure flows both ways through uvicorn's and
aiohttp's flow control), and a client disconnect cancels the upstream request at once.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Sequence
from time import perf_counter

import aiohttp
from yarl import URL

from gateway.admission import Admission
from gateway.asgi import Receive, Scope, Send, send_bytes
from gateway.errors import (
    GatewayError,
    ModelNotFound,
    ModelRequired,
    NoHealthyBackend,
    UpstreamTimeout,
    UpstreamUnavailable,
    error_body,
    error_parts,
)
from gateway.metrics import NO_MODEL, UNKNOWN_MODEL, Metrics
from gateway.policies import Policy, RequestInfo
from gateway.registry import Backend, Registry
from gateway.request_body import BodyKind, ClientDisconnected, header, read_body, routing_fields
from gateway.settings import Settings

# Connection-level headers (RFC 9110 7.6.1) and those the gateway sets itself. The client's
# Authorization is never forwarded: the backend's own key is sent instead.
DROP_REQUEST_HEADERS = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
        b"expect",
        b"authorization",
        b"x-request-id",
    }
)
DROP_RESPONSE_HEADERS = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"server",
        b"date",
        b"x-request-id",
    }
)
REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,200}")
CLIENT_CLOSED = 499  # nginx's code for "client closed the request", used in metrics only


class RetryableUpstreamError(Exception):
    """The backend failed before sending anything; another backend of the model may take the request."""


class UpstreamBrokeMidBody(Exception):
    """A non-stream answer broke after its headers went out: the connection must be dropped so the
    client sees a truncated response rather than a silently short one."""


class DisconnectWatch:
    """Waits for the client's http.disconnect and cancels the request task when it comes early."""

    def __init__(self, receive: Receive, target: asyncio.Task[object]) -> None:
        self.disconnected = False
        self.finishing = False
        self._task = asyncio.get_running_loop().create_task(self._watch(receive, target))

    async def _watch(self, receive: Receive, target: asyncio.Task[object]) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not self.finishing:
                    self.disconnected = True
                    target.cancel()
                return

    def stop(self) -> None:
        self._task.cancel()


class Proxy:
    def __init__(
        self, settings: Settings, registry: Registry, policy: Policy, admission: Admission, metrics: Metrics
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._policy = policy
        self._admission = admission
        self._metrics = metrics
        self._session: aiohttp.ClientSession | None = None
        self._first_byte_timeout = settings.timeouts.first_byte
        self._idle_timeout = settings.timeouts.idle

    def attach(self, session: aiohttp.ClientSession | None) -> None:
        """Give the proxy the lifespan-owned client session (None when the lifespan ends)."""
        self._session = session

    async def handle(self, scope: Scope, receive: Receive, send: Send, route: str, kind: BodyKind) -> None:
        started = perf_counter()
        request_id = _request_id(scope)
        model_label = NO_MODEL
        status = 0
        try:
            body = await read_body(scope, receive, self._settings.max_body_bytes)
            fields = routing_fields(kind, body, header(scope, b"content-type"))
            model_label = UNKNOWN_MODEL
            model = self._resolve_model(fields.model)
            model_label = model
            candidates = self._registry.candidates(model)
            if not candidates:
                raise NoHealthyBackend(
                    f"No healthy backend serves the model `{model}` right now.",
                    headers={"Retry-After": str(self._settings.retry_after)},
                )
            info = RequestInfo(model=model, route=route, payload=fields.payload, headers=_header_map(scope))
            status = await self._relay(scope, receive, send, body, info, candidates, request_id)
        except GatewayError as exc:
            status, headers, payload = error_parts(exc)
            headers.append((b"x-request-id", request_id))
            await send_bytes(send, status, payload, headers)
        except ClientDisconnected:
            status = CLIENT_CLOSED
        except UpstreamBrokeMidBody:
            status = 502
            raise
        finally:
            self._metrics.observe(model_label, route, status, perf_counter() - started)

    def _resolve_model(self, model: str | None) -> str:
        if model is None:
            served = self._registry.served_models()
            if len(served) == 1:
                return served[0]
            if not served:
                raise NoHealthyBackend(
                    "No backend serves any model right now.",
                    headers={"Retry-After": str(self._settings.retry_after)},
                )
            raise ModelRequired(f"`model` is required: this gateway serves {len(served)} models.", param="model")
        if self._registry.is_known(model):
            return model
        raise ModelNotFound(model)

    async def _relay(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        body: bytes,
        info: RequestInfo,
        candidates: Sequence[Backend],
        request_id: bytes,
    ) -> int:
        task = asyncio.current_task()
        assert task is not None
        watch = DisconnectWatch(receive, task)
        try:
            async with self._admission.admit(info):
                return await self._attempts(scope, send, body, info, candidates, request_id, watch)
        except asyncio.CancelledError:
            if watch.disconnected:
                task.uncancel()
                return CLIENT_CLOSED
            raise
        finally:
            watch.stop()

    async def _attempts(
        self,
        scope: Scope,
        send: Send,
        body: bytes,
        info: RequestInfo,
        candidates: Sequence[Backend],
        request_id: bytes,
        watch: DisconnectWatch,
    ) -> int:
        model = info.model
        headers = _upstream_headers(scope, request_id)
        path = scope["raw_path"] or scope["path"].encode()
        query = scope["query_string"]
        target = path + b"?" + query if query else path
        tried: list[Backend] = []
        failure = ""
        while True:
            pool = [backend for backend in candidates if backend not in tried] if tried else candidates
            if not pool:
                raise UpstreamUnavailable(f"No backend of model `{model}` could be reached ({failure}).")
            backend = self._policy.pick(pool, info)
            backend.inflight += 1  # same step as the pick: no await in between
            gauge = self._metrics.inflight.labels(model, backend.url)
            gauge.inc()
            try:
                try:
                    response = await self._open(backend, target, headers, body)
                except RetryableUpstreamError as exc:
                    tried.append(backend)
                    failure = str(exc)
                    continue
                return await self._stream(response, send, request_id, backend, watch)
            finally:
                backend.inflight -= 1
                gauge.dec()

    async def _open(
        self, backend: Backend, target: bytes, headers: list[tuple[str, str]], body: bytes
    ) -> aiohttp.ClientResponse:
        session = self._session
        if session is None:
            raise UpstreamUnavailable("The gateway is shutting down.")
        if backend.api_key:
            headers = [*headers, ("Authorization", f"Bearer {backend.api_key}")]
        url = URL(backend.url + target.decode("latin-1"), encoded=True)
        errors = self._metrics.upstream_errors
        try:
            async with asyncio.timeout(self._first_byte_timeout):
                return await session.post(url, data=body, headers=headers, allow_redirects=False)
        except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            errors.labels(backend.url, "connect").inc()
            raise RetryableUpstreamError(f"{backend.url}: {exc.__class__.__name__}: {exc}") from None
        except TimeoutError:
            errors.labels(backend.url, "timeout").inc()
            raise UpstreamTimeout(f"The backend did not answer within {self._first_byte_timeout:g} s.") from None
        except aiohttp.ClientError as exc:
            errors.labels(backend.url, "protocol").inc()
            raise UpstreamUnavailable(f"The backend failed: {exc.__class__.__name__}: {exc}") from None

    async def _stream(
        self,
        response: aiohttp.ClientResponse,
        send: Send,
        request_id: bytes,
        backend: Backend,
        watch: DisconnectWatch,
    ) -> int:
        headers = [(name.lower(), value) for name, value in response.raw_headers]
        headers = [(name, value) for name, value in headers if name not in DROP_RESPONSE_HEADERS]
        headers.append((b"x-request-id", request_id))
        is_sse = response.content_type == "text/event-stream"
        loop = asyncio.get_running_loop()
        idle = self._idle_timeout
        content = response.content
        tail = b"\n\n"
        try:
            await send({"type": "http.response.start", "status": response.status, "headers": headers})
            try:
                async with asyncio.timeout(None) as deadline:
                    while True:
                        deadline.reschedule(loop.time() + idle)
                        chunk = await content.readany()
                        if not chunk:
                            break
                        deadline.reschedule(None)  # a slow client is not an idle upstream
                        tail = chunk[-2:]
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except TimeoutError:
                failure, kind = f"The backend sent nothing for {idle:g} s.", "idle_timeout"
            except aiohttp.ClientError as exc:
                failure, kind = f"The backend connection broke: {exc.__class__.__name__}.", "disconnect"
            else:
                watch.finishing = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return response.status
        finally:
            response.close()  # no-op once released; drops the upstream connection when cut short
        self._metrics.upstream_errors.labels(backend.url, kind).inc()
        if not is_sse:
            raise UpstreamBrokeMidBody(failure)
        # The status line is gone: tell an SSE client in-band, then end the stream cleanly.
        watch.finishing = True
        separator = b"" if tail == b"\n\n" else b"\n\n"
        event = b"data: " + error_body(failure, "bad_gateway", None, 502) + b"\n\ndata: [DONE]\n\n"
        await send({"type": "http.response.body", "body": separator + event, "more_body": False})
        return 502


def _request_id(scope: Scope) -> bytes:
    given = header(scope, b"x-request-id")
    if given is not None and REQUEST_ID.fullmatch(given):
        return given
    return uuid.uuid4().hex.encode()


def _header_map(scope: Scope) -> dict[str, str]:
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}


def _upstream_headers(scope: Scope, request_id: bytes) -> list[tuple[str, str]]:
    drop = DROP_REQUEST_HEADERS
    connection = header(scope, b"connection")
    if connection:  # headers named in Connection are hop-by-hop too
        drop = drop | {token.strip().lower() for token in connection.split(b",")}
    headers = [
        (name.decode("latin-1"), value.decode("latin-1")) for name, value in scope["headers"] if name not in drop
    ]
    headers.append(("X-Request-Id", request_id.decode("latin-1")))
    return headers
