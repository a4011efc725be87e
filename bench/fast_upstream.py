"""A deliberately cheap OpenAI-compatible upstream for bench/overhead.py.

An asyncio protocol on uvloop with httptools' parser, no ASGI server and no framework: nothing between the
socket and a canned answer, so what the benchmark sees on top of it is the proxy's cost. Every process of the
benchmark shares the machine's cores, so each microsecond the upstream spends is one the proxy does not get:
a paced chunk costs it one timer and one send().

    GET  /v1/models             one vLLM-shaped model card (`--model`, default "bench-model")
    GET  /health                200 with an empty body, as vLLM answers
    GET  /metrics               vLLM's scheduler gauges (running, waiting, KV-cache usage), all zero
    POST /v1/chat/completions   non-stream: a fixed small chat.completion JSON (317 bytes);
    POST /v1/completions        "stream": true: `max_tokens` SSE chunks (default 16), each written with its
                                own send() as fast as the client takes them, then `data: [DONE]`; with
                                `"interval_ms": N` in the body, one chunk every N ms on a fixed schedule,
                                like a model decoding; with vLLM's `"return_token_ids": true` (what the
                                gateway asks of a stream it may fail over) each chunk carries its token's id,
                                as vLLM 0.32's do
    anything else               404

The request body is parsed with orjson only to read `stream`, `max_tokens`, `interval_ms` and
`return_token_ids`. A stream stops when its client goes.

Run on its own (for profiling by hand):  .venv/bin/python bench/fast_upstream.py --port 9001
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections import deque
from typing import Any, cast

import httptools
import orjson
import uvloop

DEFAULT_CHUNKS = 16
JSON = b"application/json"
METRICS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
DONE = b"data: [DONE]\n\n"
NOT_FOUND = b'{"error":{"message":"not found","type":"invalid_request_error","param":null,"code":null}}'
REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}


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


def _framed(data: bytes) -> bytes:
    """One piece of a chunked body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def answer(status: int, body: bytes, content_type: bytes = JSON) -> bytes:
    """A whole response with a content-length."""
    return b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s" % (
        status, REASONS[status], content_type, len(body), body,
    )  # fmt: skip


class Answers:
    """Every answer, prebuilt once."""

    def __init__(self, model: str) -> None:
        card = {"id": model, "object": "model", "created": 1700000000, "owned_by": "bench", "parent": None}
        card["root"] = model
        self.models = answer(200, orjson.dumps({"object": "list", "data": [card]}))
        self.completion = answer(200, _completion(model))
        self.health = answer(200, b"")
        labels = f'{{engine="0",model_name="{model}"}}'
        gauges = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")
        self.metrics = answer(200, "".join(f"vllm:{name}{labels} 0.0\n" for name in gauges).encode(), METRICS_TYPE)
        self.not_found = answer(404, NOT_FOUND)
        self.chunk = _framed(_chunk(model))
        self.chunk_with_ids = _framed(_chunk(model, token_ids=True))
        self.done = _framed(DONE) + b"0\r\n\r\n"


class Stream:
    """One SSE answer being written: all at once as the client takes it, or a chunk per interval."""

    def __init__(self, conn: Connection, chunk: bytes, count: int, interval: float) -> None:
        self._conn = conn
        self._chunk = chunk
        self._left = count
        self._interval = interval
        self._timer: asyncio.TimerHandle | None = None
        self._due = conn.loop.time()

    def start(self) -> None:
        self._conn.write(SSE_HEAD)
        if self._interval:
            self._schedule()
        else:
            self.resume()

    def resume(self) -> None:
        """Unpaced: write until done or until the client's window is full (then `resume` again when it drains)."""
        conn = self._conn
        if self._interval:
            return  # paced: the schedule goes on whatever the window (the client's reader is what's measured)
        while self._left and not conn.paused:
            self._left -= 1
            conn.write(self._chunk)
        if not self._left and not conn.paused:
            self._end()

    def _schedule(self) -> None:
        self._due += self._interval  # a fixed schedule: the sender's own lateness does not add up
        self._timer = self._conn.loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._left -= 1
        self._conn.write(self._chunk)
        if self._left:
            self._schedule()
        else:
            self._end()

    def _end(self) -> None:
        self._conn.write(self._conn.answers.done)
        self._conn.stream_ended()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class Connection(asyncio.Protocol):
    """One client connection: requests answered in order, one at a time."""

    def __init__(self, answers: Answers) -> None:
        self.answers = answers
        self.loop = asyncio.get_running_loop()
        self.paused = False
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._body: list[bytes] = []
        self._pending: deque[tuple[bytes, bytes, bytes, bool]] = deque()  # requests behind a stream
        self._stream: Stream | None = None
        self._keep_alive = True  # the streamed request's

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self.write(answer(400, b'{"error":{"message":"bad request","type":"invalid_request_error"}}'))
            self._close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._stream is not None:
            self._stream.cancel()
            self._stream = None

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self._stream is not None:
            self._stream.resume()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._body = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        method = self._parser.get_method()
        request = (method, self._url.partition(b"?")[0], b"".join(self._body), self._parser.should_keep_alive())
        if self._stream is not None:
            self._pending.append(request)
        else:
            self._handle(*request)

    def _handle(self, method: bytes, path: bytes, body: bytes, keep_alive: bool) -> None:
        answers = self.answers
        if method == b"POST" and path in (b"/v1/chat/completions", b"/v1/completions"):
            try:
                request = orjson.loads(body)
            except orjson.JSONDecodeError:
                request = {}
            if isinstance(request, dict) and request.get("stream") is True:
                chunks = request.get("max_tokens")
                interval = request.get("interval_ms")
                chunk = answers.chunk_with_ids if request.get("return_token_ids") is True else answers.chunk
                self._stream = Stream(
                    self,
                    chunk,
                    chunks if isinstance(chunks, int) and chunks > 0 else DEFAULT_CHUNKS,
                    interval / 1000 if isinstance(interval, int | float) and interval > 0 else 0.0,
                )
                self._keep_alive = keep_alive
                self._stream.start()
                return
            self.write(answers.completion)
        elif method == b"GET" and path == b"/v1/models":
            self.write(answers.models)
        elif method == b"GET" and path == b"/health":
            self.write(answers.health)
        elif method == b"GET" and path == b"/metrics":
            self.write(answers.metrics)
        else:
            self.write(answers.not_found)
        if not keep_alive:
            self._close()

    def stream_ended(self) -> None:
        self._stream = None
        if not self._keep_alive:
            self._close()
            return
        while self._pending and self._stream is None and self._transport is not None:
            self._handle(*self._pending.popleft())

    def write(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()


async def serve(host: str, port: int, model: str) -> None:
    loop = asyncio.get_running_loop()
    answers = Answers(model)
    server = await loop.create_server(lambda: Connection(answers), host, port, backlog=4096)
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument("--model", default="bench-model")
    args = parser.parse_args(argv)
    uvloop.run(serve(args.host, args.port, args.model))


if __name__ == "__main__":
    main()
