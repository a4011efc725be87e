"""A slow-reading client slows its own upstream read: the gateway never buffers a stream in memory."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.servers import ThreadedServer, gateway

CHUNK = b"data: " + b"x" * 65_530 + b"\n\n"  # 64 KiB events
TOTAL = 4 * 1024**3  # far more than any buffer: without backpressure the gateway would hold gigabytes


class Firehose:
    """An upstream that streams as fast as its client lets it, counting what it handed to the socket."""

    def __init__(self) -> None:
        self.produced = 0

    def app(self) -> Starlette:
        async def models(request: Request) -> Response:
            return JSONResponse({"object": "list", "data": [{"id": "hose", "object": "model", "parent": None}]})

        async def health(request: Request) -> Response:
            return Response()

        async def stream(request: Request) -> Response:
            async def body() -> AsyncIterator[bytes]:
                while self.produced < TOTAL:
                    self.produced += len(CHUNK)
                    yield CHUNK

            return StreamingResponse(body(), media_type="text/event-stream")

        return Starlette(
            routes=[
                Route("/health", health),
                Route("/v1/models", models),
                Route("/v1/completions", stream, methods=["POST"]),
            ]
        )


def test_slow_reader_holds_back_the_upstream() -> None:
    hose = Firehose()
    with ThreadedServer(hose.app()) as upstream, gateway(upstream.url) as gw:
        received = 0
        with httpx.stream("POST", gw.url + "/v1/completions", json={"model": "hose", "stream": True}) as response:
            assert response.status_code == 200
            started = time.monotonic()
            for chunk in response.iter_raw(65_536):
                received += len(chunk)
                time.sleep(0.01)  # about 6 MB/s: far slower than loopback
                if time.monotonic() - started > 3:
                    break
            ahead = hose.produced - received
        # What the upstream got ahead by sits in kernel socket buffers (two loopback hops) and a few
        # 64 KiB reads of the gateway's; anything near the firehose's rate would be gigabytes.
        assert received > 1_000_000, f"only {received} bytes arrived in 3 s"
        assert ahead < 64 * 1024**2, f"upstream ran {ahead / 1024**2:.0f} MiB ahead of the client"


def test_a_client_that_stops_reading_is_not_an_idle_backend() -> None:
    """The idle limit is for a silent backend. While the client is too slow to take more, the backend waits
    for it, and that wait is not counted: a reader that pauses longer than the limit gets the rest, not an
    error event."""
    hose = Firehose()
    with ThreadedServer(hose.app()) as upstream, gateway(upstream.url, timeouts={"idle": 0.3}) as gw:
        with httpx.stream("POST", gw.url + "/v1/completions", json={"model": "hose", "stream": True}) as response:
            chunks = response.iter_raw(65_536)
            received = sum(len(next(chunks)) for _ in range(50))
            time.sleep(1.5)  # five idle limits: the buffers fill and the gateway holds the backend back
            tail = b""
            for chunk in chunks:
                received += len(chunk)
                tail = (tail + chunk)[-4096:]
                if received > 64 * 1024**2:
                    break
        assert received > 64 * 1024**2  # the stream went on after the pause
        assert b'"error"' not in tail
