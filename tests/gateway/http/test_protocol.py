"""The gateway's HTTP/1.1 server protocol over real sockets: uvicorn runs it (as `python -m gateway` does) with a
small ASGI app whose `fast_routes` stand in for the proxied routes, and raw sockets speak to it, so that framing,
keep-alive, pipelining, deadlines and errors are seen byte for byte."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from gateway.http.cycle import CYCLE
from gateway.http.protocol import protocol_class
from tests.servers import free_port, wait_until

HEADER_TIMEOUT = 0.5
KEEP_ALIVE = 0.5


class App:
    """Routes by path; `/fast` is dispatched as a proxied route is (its head waits for its next send)."""

    def __init__(self) -> None:
        self.fast_routes = {"/fast": self.fast}
        self.left: list[str] = []  # paths whose client left mid-response (the CYCLE extension)
        self.left_event = threading.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path = scope["path"]
        if path == "/echo":
            body = b""
            while True:
                message = await receive()
                body += message.get("body", b"")
                if not message.get("more_body"):
                    break
            if scope["query_string"] == b"headers":  # the request's headers, then its body
                names = json.dumps([[k.decode(), v.decode()] for k, v in scope["headers"]]).encode()
                body = names + b"\n" + body
            await respond(send, 200, body)
        elif path == "/stream":  # no content-length: chunked (or, to HTTP/1.0, ended by the close)
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            for part in (b"one ", b"two ", b"three"):
                await send({"type": "http.response.body", "body": part, "more_body": True})
                await asyncio.sleep(0.01)
            await send({"type": "http.response.body", "body": b""})
        elif path == "/slow-body":  # the head alone, the body 0.3 s later
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await asyncio.sleep(0.3)
            await send({"type": "http.response.body", "body": b"ok"})
        elif path == "/boom":
            raise RuntimeError("a bug before the response")
        elif path == "/boom-midway":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"partial", "more_body": True})
            raise RuntimeError("a bug after the head")
        elif path == "/watch":  # streams until the client leaves, which the connection reports at once
            scope["extensions"][CYCLE].on_disconnect(lambda: self._left(path))
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for _ in range(500):
                await send({"type": "http.response.body", "body": b"tick\n", "more_body": True})
                await asyncio.sleep(0.01)
            await send({"type": "http.response.body", "body": b""})
        else:
            await respond(send, 404, b"no such path")

    async def fast(self, scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"4")]})
        await asyncio.sleep(0.3)  # a proxied route's head goes with its next send, not at the iteration's end
        await send({"type": "http.response.body", "body": b"fast"})

    def _left(self, path: str) -> None:
        self.left.append(path)
        self.left_event.set()


async def respond(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Server:
    def __init__(self, app: App, max_header_bytes: int = 1024) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            loop="uvloop",
            http=protocol_class(HEADER_TIMEOUT, 10, max_header_bytes),
            lifespan="on",
            log_level="warning",
            proxy_headers=False,  # as python -m gateway: with uvicorn's middleware around it, no route is fast
            timeout_keep_alive=KEEP_ALIVE,  # type: ignore[arg-type]  # uvicorn reads it as a number of seconds
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        wait_until(lambda: self.server.started, 10, what="server start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=5)


@pytest.fixture(scope="module")
def app() -> App:
    return App()


@pytest.fixture(scope="module")
def server(app: App) -> Iterator[Server]:
    with Server(app) as running:
        yield running


def request(
    method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None, version: str = "1.1"
) -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "host: test"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body:
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Reader:
    """Reads HTTP/1.1 responses off a socket, one at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buffer += data
        return bool(data)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buffer:
            if not self._fill():
                raise ConnectionError(f"closed before a head: {self.buffer!r}")
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            size = int(headers["content-length"])
            while len(self.buffer) < size:
                if not self._fill():
                    raise ConnectionError("closed mid-body")
            body, self.buffer = self.buffer[:size], self.buffer[size:]
        elif headers.get("transfer-encoding") == "chunked":
            body = self._chunks()
        else:  # ended by the connection's close
            while self._fill():
                pass
            body, self.buffer = self.buffer, b""
        return status, headers, body

    def _chunks(self) -> bytes:
        body = b""
        while True:
            while b"\r\n" not in self.buffer:
                if not self._fill():
                    raise ConnectionError("closed mid-chunk")
            size_line, self.buffer = self.buffer.split(b"\r\n", 1)
            size = int(size_line, 16)
            while len(self.buffer) < size + 2:
                if not self._fill():
                    raise ConnectionError("closed mid-chunk")
            body += self.buffer[:size]
            self.buffer = self.buffer[size + 2 :]
            if size == 0:
                return body

    def closed(self, timeout: float = 5.0) -> bool:
        """The server closes the connection within `timeout` (no more bytes come)."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True


def test_keep_alive_answers_requests_in_turn_on_one_connection(server: Server) -> None:
    with server.connect() as sock:
        reader = Reader(sock)
        for text in (b"first", b"second", b"third"):
            sock.sendall(request("POST", "/echo", text))
            status, headers, body = reader.response()
            assert (status, body) == (200, text)
            assert "connection" not in headers
            assert "date" in headers


def test_pipelined_requests_are_answered_in_order(server: Server) -> None:
    with server.connect() as sock:
        sock.sendall(request("GET", "/stream") + request("POST", "/echo", b"after") + request("GET", "/nope"))
        reader = Reader(sock)
        assert reader.response()[::2] == (200, b"one two three")
        assert reader.response()[::2] == (200, b"after")
        assert reader.response()[::2] == (404, b"no such path")


def test_a_body_without_length_is_chunked_and_ended_by_close_for_http_1_0(server: Server) -> None:
    with server.connect() as sock:
        sock.sendall(request("GET", "/stream"))
        status, headers, body = Reader(sock).response()
        assert headers["transfer-encoding"] == "chunked"
        assert body == b"one two three"
    with server.connect() as sock:
        sock.sendall(request("GET", "/stream", version="1.0"))
        reader = Reader(sock)
        status, headers, body = reader.response()
        assert status == 200
        assert "transfer-encoding" not in headers
        assert headers["connection"] == "close"
        assert body == b"one two three"


def test_a_chunked_request_body_of_a_megabyte_arrives_whole(server: Server) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB: reading pauses while the app has not taken what came
    head = b"POST /echo HTTP/1.1\r\nhost: test\r\ntransfer-encoding: chunked\r\n\r\n"
    chunks = b"".join(b"%x\r\n%s\r\n" % (65536, payload[i : i + 65536]) for i in range(0, len(payload), 65536))
    with server.connect() as sock:
        sock.sendall(head + chunks + b"0\r\n\r\n")
        status, _, body = Reader(sock).response()
    assert status == 200
    assert body == payload


def test_a_chunked_request_s_trailers_are_not_its_headers(server: Server) -> None:
    """Fields after a chunked body (trailers) never join the request's headers: a front proxy that vetted
    the headers has not seen them (RFC 9110 6.5.1). The body arrives, and the connection serves on."""
    head = b"POST /echo?headers HTTP/1.1\r\nhost: test\r\ntransfer-encoding: chunked\r\n\r\n"
    trailers = b"authorization: Bearer sk-smuggled\r\nx-injected: 1\r\n\r\n"
    with server.connect() as sock:
        sock.sendall(head + b"5;ext=1\r\nhello\r\n0\r\n" + trailers + request("POST", "/echo", body=b"next"))
        reader = Reader(sock)
        status, _, body = reader.response()
        names, _, echoed = body.partition(b"\n")
        assert status == 200
        assert echoed == b"hello"
        assert [name for name, _ in json.loads(names)] == ["host", "transfer-encoding"]
        assert reader.response()[::2] == (200, b"next")


@pytest.mark.parametrize("chunks", [b"zz\r\nhello\r\n", b"5\r\nhello\r\nzz\r\n"], ids=["first", "later"])
def test_a_malformed_chunked_body_is_answered_400(server: Server, chunks: bytes) -> None:
    head = b"POST /echo HTTP/1.1\r\nhost: test\r\ntransfer-encoding: chunked\r\n\r\n"
    with server.connect() as sock:
        sock.sendall(head + chunks)
        reader = Reader(sock)
        status, headers, body = reader.response()
        assert status == 400
        assert headers["connection"] == "close"
        assert json.loads(body)["error"]["type"] == "invalid_request_error"
        assert reader.closed()


@pytest.mark.parametrize("split", [0, 3, 1000], ids=["with-head", "split", "later"])
def test_an_upgrade_offer_is_declined_and_the_request_s_body_read(server: Server, split: int) -> None:
    """curl --http2 (and Java's HttpClient) offer h2c on a plain-HTTP POST: the request is answered as HTTP/1.1,
    its body read whole however it arrives, and the connection closed after it."""
    head = request(
        "POST",
        "/echo",
        body=b"hello world",
        headers={"connection": "Upgrade, HTTP2-Settings", "upgrade": "h2c", "http2-settings": "AAMAAABkAAQAoAAA"},
    )
    at = len(head) - len(b"hello world") + split
    with server.connect() as sock:
        sock.sendall(head[:at])
        time.sleep(0.05)
        sock.sendall(head[at:])
        reader = Reader(sock)
        status, headers, body = reader.response()
        assert (status, body) == (200, b"hello world")
        assert headers["connection"] == "close"
        assert reader.closed()


def test_expect_100_continue_is_answered_before_the_body_is_read(server: Server) -> None:
    with server.connect() as sock:
        sock.sendall(request("POST", "/echo", headers={"expect": "100-continue", "content-length": "5"}))
        sock.settimeout(5)
        assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(b"hello")
        assert Reader(sock).response()[::2] == (200, b"hello")


def test_head_request_has_the_length_and_no_body(server: Server) -> None:
    with server.connect() as sock:
        sock.sendall(request("HEAD", "/echo") + request("POST", "/echo", b"next"))
        reader = Reader(sock)
        while b"\r\n\r\n" not in reader.buffer:
            reader._fill()
        head, reader.buffer = reader.buffer.split(b"\r\n\r\n", 1)
        assert b"content-length: 0" in head
        assert reader.response()[::2] == (200, b"next")  # nothing of a body came between the two


def test_invalid_http_is_answered_400_in_the_openai_shape_and_closed(server: Server) -> None:
    with server.connect() as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        reader = Reader(sock)
        status, headers, body = reader.response()
        assert status == 400
        assert headers["connection"] == "close"
        error = json.loads(body)["error"]
        assert error["type"] == "invalid_request_error"
        assert error["message"].startswith("Invalid HTTP request")
        assert reader.closed()


def test_a_head_over_twice_the_limits_is_refused_431_while_parsed(server: Server) -> None:
    many = {f"x-header-{i}": "v" for i in range(21)}  # the limit is 10 headers; the parser stops past 20
    with server.connect() as sock:
        sock.sendall(request("GET", "/echo", headers=many))
        reader = Reader(sock)
        status, _, body = reader.response()
        assert status == 431
        assert json.loads(body)["error"]["message"] == "The request head is too large."
        assert reader.closed()
    with server.connect() as sock:  # within twice the limits the app sees it (the gatekeeper's exact limit)
        sock.sendall(request("POST", "/echo", b"ok", headers={f"x-header-{i}": "v" for i in range(15)}))
        assert Reader(sock).response()[::2] == (200, b"ok")


def test_a_connection_that_sends_no_head_is_closed_at_the_header_timeout(server: Server) -> None:
    with server.connect() as silent, server.connect() as trickling:
        started = time.monotonic()
        trickling.sendall(b"GET /echo HTTP/1.1\r\nhost: test\r\n")
        time.sleep(HEADER_TIMEOUT / 2)
        trickling.sendall(b"x-more: 1\r\n")  # still no end of head: the deadline does not move
        assert Reader(silent).closed()
        assert Reader(trickling).closed()
        assert HEADER_TIMEOUT * 0.8 <= time.monotonic() - started < HEADER_TIMEOUT * 4


def test_an_idle_kept_alive_connection_closes_after_the_keep_alive_timeout(server: Server) -> None:
    with server.connect() as sock:
        sock.sendall(request("POST", "/echo", b"x"))
        reader = Reader(sock)
        reader.response()
        answered = time.monotonic()
        assert reader.closed()
        assert KEEP_ALIVE * 0.8 <= time.monotonic() - answered < KEEP_ALIVE * 4


def test_a_busy_connection_outlives_both_timeouts(server: Server) -> None:
    with server.connect() as sock:
        sock.sendall(request("GET", "/slow-body"))
        time.sleep(HEADER_TIMEOUT * 0.4)
        sock.sendall(request("POST", "/echo", b"pipelined"))  # read only once /slow-body is answered
        reader = Reader(sock)
        assert reader.response()[::2] == (200, b"ok")
        assert reader.response()[::2] == (200, b"pipelined")


def test_an_app_error_before_the_head_is_a_500_in_the_openai_shape(server: Server) -> None:
    with server.connect() as sock:
        sock.sendall(request("GET", "/boom"))
        reader = Reader(sock)
        status, _, body = reader.response()
        assert status == 500
        assert json.loads(body)["error"]["type"] == "internal_error"
        assert reader.closed()


def test_an_app_error_after_the_head_cuts_the_answer_off(server: Server) -> None:
    with server.connect() as sock:
        sock.sendall(request("GET", "/boom-midway"))
        reader = Reader(sock)
        with pytest.raises(ConnectionError, match="closed mid-chunk"):
            reader.response()  # no terminating chunk: the client cannot take it for a whole answer


def test_a_client_that_leaves_is_reported_at_once(server: Server, app: App) -> None:
    with server.connect() as sock:
        sock.sendall(request("GET", "/watch"))
        sock.settimeout(5)
        assert b"tick" in sock.recv(4096)
        left_at = time.monotonic()
    assert app.left_event.wait(2)
    assert time.monotonic() - left_at < 1.0
    assert app.left == ["/watch"]


def head_arrival(server: Server, payload: bytes) -> float:
    """Seconds from sending `payload` until the first bytes of the answer arrive."""
    with server.connect() as sock:
        sent = time.monotonic()
        sock.sendall(payload)
        sock.settimeout(5)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200 OK")
        return time.monotonic() - sent


def test_an_apps_head_goes_at_once_and_a_proxied_routes_with_its_next_send(server: Server) -> None:
    assert head_arrival(server, request("GET", "/slow-body")) < 0.25  # flushed at the end of the iteration
    assert head_arrival(server, request("POST", "/fast", b"{}")) >= 0.25  # held for the body 0.3 s later


def test_a_fast_route_is_only_a_post(server: Server) -> None:
    with server.connect() as sock:
        sock.sendall(request("GET", "/fast"))
        assert Reader(sock).response()[0] == 404  # the app's routing, not the fast route's


def test_answered_requests_leave_the_servers_task_set(server: Server) -> None:
    before = set(server.server.server_state.tasks)  # other tests' apps may still be running
    with server.connect() as sock:
        reader = Reader(sock)
        for _ in range(5):
            sock.sendall(request("POST", "/echo", b"x"))
            reader.response()
        sock.sendall(request("GET", "/boom"))
        reader.response()
    wait_until(lambda: server.server.server_state.tasks <= before, 2, what="the answered requests to leave the set")


def test_an_upgrade_offer_with_a_chunked_body_is_refused_not_sent_on_without_it(server: Server) -> None:
    """llhttp stops at an Upgrade request's head; a body of declared length is read after it, a chunked one
    cannot be: the request is refused in the OpenAI error shape, never passed on with an empty body."""
    head = request("POST", "/echo", headers={"connection": "Upgrade", "upgrade": "h2c", "transfer-encoding": "chunked"})
    with server.connect() as sock:
        sock.sendall(head + b"b\r\nhello world\r\n0\r\n\r\n")
        reader = Reader(sock)
        status, headers, body = reader.response()
        assert status == 400
        assert "chunked body" in json.loads(body)["error"]["message"]
        assert headers["connection"] == "close"
        assert reader.closed()


@pytest.mark.parametrize(
    ("method", "target", "status"),
    [("GET", "/" + "a" * 70_000, 414), ("CONNECT", "example.com:443", 400)],
    ids=["longer-than-llhttp-parses", "authority-form"],
)
def test_a_target_that_is_no_path_is_refused_clearly(app: App, method: str, target: str, status: int) -> None:
    """A head within the limits (the gateway's default allows 64 KiB of headers) whose target llhttp's URL
    parser cannot take: a clear 414 or 400, not "User callback error"."""
    with Server(app, max_header_bytes=65536) as server, server.connect() as sock:
        sock.sendall(request(method, target))
        reader = Reader(sock)
        answer, headers, body = reader.response()
        assert headers["connection"] == "close"
        assert answer == status
        message = json.loads(body)["error"]["message"]
        assert "request target" in message
        assert "callback" not in message
        assert reader.closed()


def test_an_upgrade_request_is_answered_as_plain_http_and_closed(server: Server) -> None:
    with server.connect() as sock:
        sock.sendall(b"GET /stream HTTP/1.1\r\nhost: test\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n")
        reader = Reader(sock)
        status, headers, body = reader.response()
        assert (status, body) == (200, b"one two three")
        assert headers["connection"] == "close"
        assert reader.closed()
