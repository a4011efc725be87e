"""The header-deadline protocol extends uvicorn's private HttpToolsProtocol: these checks fail loudly, naming
what changed, if a uvicorn upgrade moves the internals it relies on. (The deadline's behaviour itself is
tested by tests/resilience/test_slowloris.py.)"""

from __future__ import annotations

import asyncio
import inspect
import re
import socket
import threading
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from gateway.proxy.client_protocol import HeadDeadlineProtocol, with_header_timeout
from tests.servers import free_port, wait_until

OVERRIDDEN = (
    "connection_made",
    "data_received",
    "on_message_begin",
    "on_headers_complete",
    "on_message_complete",
    "connection_lost",
)
ROOT = Path(__file__).resolve().parents[3]


def test_uvicorn_is_the_pinned_release() -> None:
    pinned = re.search(r'"uvicorn\[standard\]==([\w.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pinned is not None, "pyproject.toml must pin uvicorn exactly (gateway/proxy/client_protocol.py)"
    assert uvicorn.__version__ == pinned.group(1), (
        f"uvicorn {uvicorn.__version__} is installed, {pinned.group(1)} is pinned: re-check client_protocol.py"
    )


def test_the_methods_it_overrides_still_exist_with_the_same_signatures() -> None:
    for name in OVERRIDDEN:
        assert name in HttpToolsProtocol.__dict__, f"uvicorn's HttpToolsProtocol no longer defines {name}()"
        ours = inspect.signature(getattr(HeadDeadlineProtocol, name))
        theirs = inspect.signature(getattr(HttpToolsProtocol, name))
        assert list(ours.parameters) == list(theirs.parameters), f"{name}() now takes {theirs}"
    assert "response_complete" in inspect.getsource(RequestResponseCycle.__init__), (
        "uvicorn's RequestResponseCycle no longer has response_complete, which the head deadline reads"
    )


def test_the_cycle_it_reads_is_there_over_a_real_connection() -> None:
    """`self.cycle` is None before the first request and a finished RequestResponseCycle after each answer."""
    seen: list[tuple[str, Any]] = []

    class Recording(with_header_timeout(5.0)):  # type: ignore[misc,valid-type]
        def data_received(self, data: bytes) -> None:
            cycle = self.cycle
            seen.append(("data", None if cycle is None else cycle.response_complete))
            super().data_received(data)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, http=Recording, lifespan="off", log_level="warning")
    )
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, 10, what="server start")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            for _ in range(2):
                sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                answer = b""
                while not answer.endswith(b"ok"):
                    answer += sock.recv(4096)
        assert seen == [("data", None), ("data", True)], seen
    finally:
        server.should_exit = True
        thread.join(10)
