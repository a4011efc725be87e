"""An OpenAI-compatible server that is not vLLM: it answers every POST with a scripted event stream, framed
and ordered as its test says (CRLF line ends, choices before the head), paced by the test, and can die in
the middle of it. It serves /v1/models like vLLM, so the gateway learns its model, and keeps what it was
asked."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

DIE = b""  # in a script: the server fails here, mid-body (the connection closes without the body's end)


@dataclass
class Script:
    """What every POST gets: these pieces of body, in order; each waits for its gate first (if it has one)."""

    pieces: list[bytes]
    gates: dict[int, threading.Event] = field(default_factory=dict)  # piece index -> wait for this first
    requests: list[tuple[str, bytes]] = field(default_factory=list)  # (path, body) of every POST


def scripted_app(model: str, script: Script) -> ASGIApp:
    cards = orjson.dumps({"object": "list", "data": [{"id": model, "object": "model", "root": model, "parent": None}]})

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["method"] != "POST":
            answer = cards if scope["path"] == "/v1/models" else b""
            json_type = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 200, "headers": json_type})
            await send({"type": "http.response.body", "body": answer})
            return
        script.requests.append((scope["path"], body))
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for index, piece in enumerate(script.pieces):
            gate = script.gates.get(index)
            if gate is not None:
                await asyncio.get_running_loop().run_in_executor(None, gate.wait, 10)
            if piece == DIE:
                raise ConnectionAbortedError("the scripted server dies mid-stream")
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    return app
