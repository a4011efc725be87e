"""A deliberately cheap OpenAI-compatible upstream for bench/overhead.py.

Raw ASGI under uvicorn (httptools + uvloop, no access log): nothing between the socket and a canned answer,
so what the benchmark sees on top of it is the gateway's cost.

    GET  /v1/models             one vLLM-shaped model card (`--model`, default "bench-model")
    GET  /health                200 with an empty body, as vLLM answers
    GET  /metrics               vLLM's scheduler gauges (running, waiting, KV-cache usage), all zero
    POST /v1/chat/completions   non-stream: a fixed small chat.completion JSON (317 bytes);
    POST /v1/completions        "stream": true: `max_tokens` SSE chunks (default 16), each written with its
                                own send() as fast as the event loop allows, then `data: [DONE]`; with
                                `"interval_ms": N` in the body, one chunk every N ms, like a model decoding;
                                with vLLM's `"return_token_ids": true` (what the gateway asks of a stream
                                it may fail over) each chunk carries its token's id, as vLLM 0.32's do
    anything else               404

The request body is parsed with orjson only to read `stream`, `max_tokens`, `interval_ms` and
`return_token_ids`.

Run on its own (for profiling by hand):  .venv/bin/python bench/fast_upstream.py --port 9001
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson
import uvicorn

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DEFAULT_CHUNKS = 16
JSON_HEADERS = [(b"content-type", b"application/json")]
TEXT_HEADERS = [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")]
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
NOT_FOUND = b'{"error":{"message":"not found","type":"invalid_request_error","param":null,"code":null}}'


def _completion(model: str) -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-bench0000000000000000",
            "object": "chat.completion",
            "created": 1700000000,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello! How can I help you today?"},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21},
        }
    )


def _chunk(model: str, token_ids: bool = False) -> bytes:
    choice: dict[str, Any] = {"index": 0, "delta": {"content": " tok"}, "logprobs": None, "finish_reason": None}
    if token_ids:
        choice["token_ids"] = [10957]
    event = orjson.dumps(
        {
            "id": "chatcmpl-bench0000000000000000",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": model,
            "choices": [choice],
        }
    )
    return b"data: " + event + b"\n\n"


class FastUpstream:
    """The ASGI app; every answer is prebuilt bytes."""

    def __init__(self, model: str) -> None:
        card = {"id": model, "object": "model", "created": 1700000000, "owned_by": "bench", "parent": None}
        card["root"] = model
        self._models = orjson.dumps({"object": "list", "data": [card]})
        self._completion = _completion(model)
        self._chunk = _chunk(model)
        self._chunk_with_ids = _chunk(model, token_ids=True)
        labels = f'{{engine="0",model_name="{model}"}}'
        gauges = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")
        self._metrics = "".join(f"vllm:{name}{labels} 0.0\n" for name in gauges).encode()

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        method = scope["method"]
        if method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
            body = await _read_body(receive)
            try:
                request = orjson.loads(body)
            except orjson.JSONDecodeError:
                request = {}
            if isinstance(request, dict) and request.get("stream") is True:
                chunks = request.get("max_tokens")
                interval = request.get("interval_ms")
                await self._stream(
                    send,
                    chunks if isinstance(chunks, int) and chunks > 0 else DEFAULT_CHUNKS,
                    interval / 1000 if isinstance(interval, int | float) and interval > 0 else 0.0,
                    request.get("return_token_ids") is True,
                )
            else:
                await _answer(send, 200, self._completion, JSON_HEADERS)
        elif method == "GET" and path == "/v1/models":
            await _answer(send, 200, self._models, JSON_HEADERS)
        elif method == "GET" and path == "/health":
            await _answer(send, 200, b"", [])
        elif method == "GET" and path == "/metrics":
            await _answer(send, 200, self._metrics, TEXT_HEADERS)
        else:
            await _answer(send, 404, NOT_FOUND, JSON_HEADERS)

    async def _stream(self, send: Send, chunks: int, interval: float, token_ids: bool) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        chunk = self._chunk_with_ids if token_ids else self._chunk
        message = {"type": "http.response.body", "body": chunk, "more_body": True}
        loop = asyncio.get_running_loop()
        due = loop.time()
        for _ in range(chunks):
            if interval:
                due += interval  # on a fixed schedule: the sender's own lateness does not add up
                await asyncio.sleep(max(due - loop.time(), 0.0))
            await send(message)
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


async def _read_body(receive: Receive) -> bytes:
    parts: list[bytes] = []
    while True:
        message = await receive()
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


async def _answer(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    length = (b"content-length", str(len(body)).encode())
    await send({"type": "http.response.start", "status": status, "headers": [*headers, length]})
    await send({"type": "http.response.body", "body": body})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument("--model", default="bench-model")
    args = parser.parse_args(argv)
    uvicorn.run(
        FastUpstream(args.model),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level="warning",
        server_header=False,
        date_header=False,
    )


if __name__ == "__main__":
    main()
