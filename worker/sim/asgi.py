"""Small pure-ASGI helpers: read a body, answer JSON/text, look up headers (ASGI types from starlette)."""

from __future__ import annotations

import orjson
from starlette.types import Receive, Scope, Send

from worker.sim.protocol import ApiError

MAX_BODY_BYTES = 32 * 1024 * 1024


class ClientGone(Exception):
    """The client disconnected before its request body was read."""


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


async def read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ClientGone
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, "Request body too large", "BadRequestError")
        chunks.append(chunk)
        if not msg.get("more_body", False):
            return b"".join(chunks)


async def send_bytes(send: Send, status: int, body: bytes, content_type: bytes) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_json(send: Send, status: int, obj: object) -> None:
    await send_bytes(send, status, orjson.dumps(obj), b"application/json")


async def send_text(send: Send, status: int, text: str) -> None:
    await send_bytes(send, status, text.encode(), b"text/plain; charset=utf-8")


async def send_error(send: Send, err: ApiError) -> None:
    await send_json(send, err.status, err.body())
