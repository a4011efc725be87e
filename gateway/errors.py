"""The gateway's one exception tree, and its mappings: transport failures to client errors (`upstream_failure`),
client errors to OpenAI-shaped responses (`error_parts`).

    SwitchyardError
    ├── ConfigError                 the configuration is invalid: the process does not start
    ├── ClientDisconnected          the client left before there was anything to answer
    ├── AnswerTruncated             a non-stream answer broke after its head went out
    ├── UpstreamError               talking to a backend failed (internal: never answered as it is)
    │   ├── ConnectFailed, Unanswered, BadResponse, BodyBroken, HeadTimeout, IdleTimeout
    │   └── ErrorEvent              a stream's backend sent vLLM's in-band error event (a failover may follow)
    └── GatewayError                answered as {"error": {"message", "type", "param", "code"}}
        ├── InvalidRequest (400) ── ModelRequired, UnsupportedMediaType
        ├── Unauthorized (401), RouteNotFound, ModelNotFound, ResponseNotFound (404), MethodNotAllowed (405)
        ├── BodyTimeout (408), PayloadTooLarge (413), HeadersTooLarge (431)
        ├── Rejected (429) ── RateLimited, Overloaded
        └── UpstreamUnavailable (502), NoHealthyBackend (503), UpstreamTimeout (504)
"""

from __future__ import annotations

import orjson


class SwitchyardError(Exception):
    """Root of every error the gateway raises on purpose."""


class ConfigError(SwitchyardError):
    """The configuration is invalid; the process must not start."""


class GatewayError(SwitchyardError):
    """An error answered to the client as `{"error": {"message", "type", "param", "code"}}`."""

    status: int = 500
    error_type: str = "internal_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}

    def body(self) -> bytes:
        return error_body(self.message, self.error_type, self.param, self.code)


def error_body(message: str, error_type: str, param: str | None = None, code: str | int | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": error_type, "param": param, "code": code}})


class InvalidRequest(GatewayError):
    status = 400
    error_type = "invalid_request_error"


class ModelRequired(InvalidRequest):
    code = "model_required"


class Unauthorized(GatewayError):
    status = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class RouteNotFound(GatewayError):
    status = 404
    error_type = "invalid_request_error"
    code = "unknown_url"


class ModelNotFound(GatewayError):
    status = 404
    error_type = "NotFoundError"
    code = "model_not_found"

    def __init__(self, model: str):
        super().__init__(f"The model `{model}` does not exist.", param="model")


class ResponseNotFound(GatewayError):
    status = 404
    error_type = "invalid_request_error"
    code = "response_not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    error_type = "invalid_request_error"
    code = "method_not_allowed"


class BodyTimeout(GatewayError):
    """The client stopped sending its request body (a slow-body slowloris, or a stalled upload)."""

    status = 408
    error_type = "invalid_request_error"
    code = "request_timeout"


class PayloadTooLarge(GatewayError):
    status = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class Rejected(GatewayError):
    """Turned away to protect the backends or a tenant's quota (429, with Retry-After); `reason` labels metrics."""

    status = 429
    error_type = "rate_limit_exceeded"
    reason = "rejected"


class RateLimited(Rejected):
    code = "rate_limit_exceeded"
    reason = "rate_limit"


class Overloaded(Rejected):
    """Admission control turned the request away; the reason also goes out as X-Switchyard-Reject-Reason."""

    def __init__(self, message: str, reason: str, retry_after: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after), "X-Switchyard-Reject-Reason": reason})
        self.code = reason
        self.reason = reason


class HeadersTooLarge(GatewayError):
    status = 431
    error_type = "invalid_request_error"
    code = "request_headers_too_large"


class UnsupportedMediaType(InvalidRequest):
    code = "unsupported_media_type"


class NoHealthyBackend(GatewayError):
    status = 503
    error_type = "service_unavailable"
    code = "no_healthy_backend"

    @classmethod
    def for_model(cls, model: str, retry_after: int) -> NoHealthyBackend:
        """The answer for a known model nothing serves right now."""
        return cls(
            f"No healthy backend serves the model `{model}` right now.", headers={"Retry-After": str(retry_after)}
        )


class UpstreamUnavailable(GatewayError):
    """No backend could be reached, or one failed before answering."""

    status = 502
    error_type = "bad_gateway"
    code = "upstream_unavailable"


class UpstreamTimeout(GatewayError):
    status = 504
    error_type = "gateway_timeout"
    code = "upstream_timeout"


class ClientDisconnected(SwitchyardError):
    """The client went away before its request body arrived; there is nobody to answer."""


class AnswerTruncated(SwitchyardError):
    """A non-stream answer broke after its head went out. Raised out of the ASGI app, so that the server drops
    the connection and the client sees a truncated response rather than a silently short one."""


class UpstreamError(SwitchyardError):
    """The exchange with a backend failed at the transport or HTTP level."""


class ConnectFailed(UpstreamError):
    """The request did not reach the backend: the connection could not be made, or it closed as the request
    went out, before the backend could read it."""


class Unanswered(UpstreamError):
    """The backend closed the connection without a single response byte, after it could have read the request
    (it died mid-generation, say): tried elsewhere, never sent to it again."""


class BadResponse(UpstreamError):
    """The backend sent bytes that are not an HTTP/1.1 response, or closed inside the response head."""


class BodyBroken(UpstreamError):
    """The response head arrived, then the connection broke or went bad before the body ended."""


class HeadTimeout(UpstreamError):
    """The request went out; the response head did not come within `seconds`."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"no response within {seconds:g} s")
        self.seconds = seconds


class IdleTimeout(UpstreamError):
    """The response body stalled: no bytes for longer than `seconds`."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"the backend sent nothing for {seconds:g} s")
        self.seconds = seconds


class ErrorEvent(UpstreamError):
    """A stream's backend sent vLLM's mid-stream error event (`data: {"error": ...}`) after content went out.
    `event` is that SSE event as received, passed on to the client when the stream cannot be continued."""

    def __init__(self, event: bytes) -> None:
        super().__init__("the backend sent an error event mid-stream")
        self.event = event


def upstream_failure(
    exc: UpstreamError, *, model: str, backend: str, mid_body: bool = False
) -> tuple[str, GatewayError]:
    """The one translation of a transport failure: (the `kind` label of switchyard_upstream_errors_total, the
    error the client is told). `mid_body`: the response head had arrived (for a stream, bytes reached the client)."""
    if mid_body:
        if isinstance(exc, IdleTimeout):
            return "idle_timeout", UpstreamUnavailable(f"The backend sent nothing for {exc.seconds:g} s.")
        if isinstance(exc, ErrorEvent):
            return "error_event", UpstreamUnavailable("The backend failed mid-stream.")
        return "disconnect", UpstreamUnavailable(f"The backend connection broke: {exc}.")
    if isinstance(exc, ConnectFailed):
        return "connect", UpstreamUnavailable(f"No backend of model `{model}` could be reached ({backend}: {exc}).")
    if isinstance(exc, Unanswered):
        return "disconnect", UpstreamUnavailable(f"The backend closed the connection without answering ({backend}).")
    if isinstance(exc, HeadTimeout):
        return "timeout", UpstreamTimeout(f"The backend did not answer within {exc.seconds:g} s.")
    return "protocol", UpstreamUnavailable(f"The backend failed: {exc}")


def error_parts(exc: GatewayError) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """The one mapping from an error to (status, headers, body); every error response goes through it."""
    headers = [(b"content-type", b"application/json")]
    headers += [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in exc.headers.items()]
    return exc.status, headers, exc.body()


def from_http_status(status: int, detail: str) -> GatewayError:
    """Turn a routing-level HTTP status (unknown path, wrong method) into the matching error."""
    if status == 405:
        return MethodNotAllowed(detail)
    if status == 404:
        return RouteNotFound(detail)
    error = InvalidRequest(detail)
    error.status = status
    return error
