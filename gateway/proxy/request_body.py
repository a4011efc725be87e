"""Reading a request body within its limit, and parsing it once for what routing needs.

The body is forwarded as the bytes received. A JSON body is parsed once, and the parsed payload is kept for
the policies that look at the prompt; a multipart body is only searched for its `model` field.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from enum import Enum
from typing import Any

import orjson
from starlette.types import Receive, Scope

from gateway.errors import BodyTimeout, ClientDisconnected, InvalidRequest, PayloadTooLarge
from gateway.http.cycle import BODY_RECEIVED
from gateway.proxy.headers import header
from gateway.proxy.vllm_bool import is_true


class BodyKind(Enum):
    JSON = "json"
    MULTIPART = "multipart"
    RESPONSE_ID = "response_id"  # GET /v1/responses/{id} and its cancel: routed by the id in the path


@dataclass(frozen=True, slots=True)
class RoutingFields:
    model: str | None
    payload: dict[str, Any] | None = None  # the parsed JSON body, for policies that look at the prompt

    @property
    def stream(self) -> bool:
        return self.payload is not None and is_true(self.payload.get("stream"))


async def read_body(scope: Scope, receive: Receive, limit: int, stall_timeout: float) -> bytes:
    """The whole body, within `limit` bytes; BodyTimeout when the client sends nothing for `stall_timeout`."""
    declared = header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"Request body of {int(declared)} bytes exceeds the limit of {limit} bytes.")
    if scope.get(BODY_RECEIVED):
        # The server saw the whole body arrive before the app started: receive() returns it at once, so it
        # needs no timer (one costs microseconds, and this is every small request).
        message = await receive()
        if message["type"] == "http.request" and not message.get("more_body", False):
            body: bytes = message.get("body", b"")
            if len(body) > limit:
                raise PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes.")
            return body
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunks = [message.get("body", b"")]
        size = len(chunks[0])
    else:
        chunks = []
        size = 0
    while True:
        try:
            async with asyncio.timeout(stall_timeout):
                message = await receive()
        except TimeoutError:
            raise BodyTimeout(f"The request body stalled: nothing arrived for {stall_timeout:g} s.") from None
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk: bytes = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes.")
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def routing_fields(kind: BodyKind, body: bytes, content_type: bytes | None, max_depth: int = 64) -> RoutingFields:
    if kind is BodyKind.MULTIPART:
        return RoutingFields(model=_multipart_model(body, content_type))
    if kind is BodyKind.RESPONSE_ID:
        return RoutingFields(model=None)
    return _json_fields(body, max_depth)


def _json_fields(body: bytes, max_depth: int) -> RoutingFields:
    try:
        data: Any = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        data = _lenient_json(body, exc)
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    # Counting brackets is cheap and bounds the depth from above: most bodies never need the walk.
    if body.count(b"[") + body.count(b"{") > max_depth and _deeper_than(data, max_depth):
        raise InvalidRequest(f"The request body nests arrays and objects deeper than {max_depth} levels.")
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequest("`model` must be a string.", param="model")
    return RoutingFields(model=model or None, payload=data)


def _lenient_json(body: bytes, error: orjson.JSONDecodeError) -> Any:
    """What vLLM's own parser (Python's json) reads where orjson does not: NaN and Infinity, a UTF-8 byte order
    mark. Anything else is answered with orjson's message, a lone surrogate escape (text that is no Unicode,
    which the gateway could not serialise again for routing or a failover) included."""
    try:
        data = json.loads(body)
        orjson.dumps(data)
    except (ValueError, RecursionError, orjson.JSONEncodeError):
        raise InvalidRequest(f"The request body is not valid JSON: {error}") from None
    return data


def _deeper_than(value: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def _multipart_model(body: bytes, content_type: bytes | None) -> str | None:
    """Find the form field `model` in a multipart/form-data body without decoding the other parts."""
    boundary = _boundary(content_type)
    # A delimiter is a line of its own (RFC 2046 5.1.1): CRLF, "--", the boundary. The same bytes inside a
    # part (a file's content) split nothing, so a file cannot pose as the `model` field.
    delimiter = b"\r\n--" + boundary
    for part in (b"\r\n" + body).split(delimiter)[1:]:
        if part.startswith(b"--"):
            break  # the closing delimiter
        head, sep, value = part.partition(b"\r\n\r\n")
        if not sep:
            raise InvalidRequest("Malformed multipart body: a part has no header end.")
        if _is_model_field(head):
            try:
                return value.removesuffix(b"\r\n").decode().strip() or None
            except UnicodeDecodeError:
                raise InvalidRequest("The form field `model` is not valid UTF-8.", param="model") from None
    return None


def _boundary(content_type: bytes | None) -> bytes:
    if content_type is None or not content_type.lower().startswith(b"multipart/form-data"):
        raise InvalidRequest("This endpoint takes multipart/form-data.")
    for param in content_type.split(b";")[1:]:
        key, _, value = param.strip().partition(b"=")
        if key.lower() == b"boundary" and value.strip(b'"'):
            return value.strip(b'"')
    raise InvalidRequest("The multipart/form-data content type has no boundary.")


def _is_model_field(head: bytes) -> bool:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-disposition":
            params = [item.strip() for item in value.split(b";")]
            return b'name="model"' in params or b"name=model" in params
    return False
