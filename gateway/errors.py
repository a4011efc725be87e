"""The gateway's one exception tree and its one mapping to OpenAI-shaped error responses."""

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


class RateLimited(GatewayError):
    status = 429
    error_type = "rate_limit_exceeded"
    code = "rate_limit_exceeded"


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


class UpstreamUnavailable(GatewayError):
    """No backend could be reached, or one failed before answering."""

    status = 502
    error_type = "bad_gateway"
    code = "upstream_unavailable"


class UpstreamTimeout(GatewayError):
    status = 504
    error_type = "gateway_timeout"
    code = "upstream_timeout"


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
