"""Which headers cross the gateway, and the few the gateway reads or sets itself."""

from __future__ import annotations

import os
import re

from starlette.types import Scope

# Connection-level headers (RFC 9110 7.6.1) and those the gateway sets itself. The client's key is never
# forwarded (Authorization, or x-api-key / api-key as Anthropic's and Azure's SDKs send it): the backend's own
# key is sent instead. Nor is its Accept-Encoding: the
# gateway reads the answers (usage, a stream's events), so it asks for them unencoded (IDENTITY).
DROP_REQUEST_HEADERS = frozenset(
    {
        b"accept-encoding",
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
        b"x-api-key",
        b"api-key",
        b"x-request-id",
    }
)
IDENTITY = (b"accept-encoding", b"identity")  # without one, any coding would do (RFC 9110 12.5.3)
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
DROP_RESPONSE_HEADERS_AND_LENGTH = DROP_RESPONSE_HEADERS | {b"content-length"}  # for a body the gateway rewrites
REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,200}")


def header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


class RequestIds:
    """Each request's id: the client's `X-Request-Id` when it is printable (up to 200 characters), else 32 hex
    digits unique to this process start (a random prefix) and to the request (a counter). A random id per
    request cost a getrandom syscall; ids only correlate log lines and traces, so they need not be unguessable."""

    __slots__ = ("_count", "_prefix")

    def __init__(self) -> None:
        self._prefix = os.urandom(8).hex().encode()
        self._count = 0

    def of(self, scope: Scope) -> bytes:
        given = header(scope, b"x-request-id")
        if given is not None and REQUEST_ID.fullmatch(given):
            return given
        self._count += 1
        return b"%s%016x" % (self._prefix, self._count)


def client_host(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else ""


def upstream_headers(scope: Scope, request_id: bytes) -> list[tuple[bytes, bytes]]:
    drop = DROP_REQUEST_HEADERS
    connection = header(scope, b"connection")
    if connection:  # headers named in Connection are hop-by-hop too
        drop = drop | {token.strip().lower() for token in connection.split(b",")}
    headers = [(name, value) for name, value in scope["headers"] if name not in drop]
    headers.append(IDENTITY)
    headers.append((b"x-request-id", request_id))
    return headers
