"""The proxy's upstream client against real TCP servers that answer with exactly the bytes each case needs.

Every case runs on asyncio's loop and on uvloop (tests/gateway/conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from gateway.errors import BadResponse, BodyBroken, ConnectFailed, HeadTimeout, IdleTimeout, Unanswered
from gateway.proxy import upstream as upstream_module
from gateway.proxy.upstream import HIGH_WATER, UNREAD_S, UpstreamPool, UpstreamResponse

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


class RawServer:
    """A TCP server on 127.0.0.1 (TLS when given a context) that counts connections and hands each to
    `handler`."""

    def __init__(self, handler: Handler, tls: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.tls = tls
        self.connections = 0
        self.open = 0
        self.requests: list[bytes] = []
        self.url = ""
        self._server: asyncio.Server | None = None

    @classmethod
    def replying(cls, answer: bytes, tls: ssl.SSLContext | None = None) -> RawServer:
        """A server that reads one request per connection, writes `answer` and waits for the client to close."""

        async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
            writer.write(answer)
            await reader.read()

        server = cls(reply, tls)
        return server

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open -= 1
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        request = await self.read_request_from(reader)
        self.requests.append(request)
        return request

    @staticmethod
    async def read_request_from(reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        return head + await reader.readexactly(length)


@contextlib.asynccontextmanager
async def pool(keepalive: float = 5.0, connect_timeout: float = 2.0) -> AsyncIterator[UpstreamPool]:
    upstream = UpstreamPool(keepalive, connect_timeout)
    try:
        yield upstream
    finally:
        upstream.close()


async def read_all(response: UpstreamResponse) -> bytes:
    parts = []
    while chunk := await response.readany():
        parts.append(chunk)
    return b"".join(parts)


async def post(
    upstream: UpstreamPool, url: str, body: bytes = b'{"model":"m"}', head_timeout: float = 5.0
) -> UpstreamResponse:
    headers = [(b"content-type", b"application/json"), (b"x-request-id", b"r1")]
    return await upstream.request(url, b"POST", b"/v1/chat/completions?x=1", headers, body, head_timeout)


async def answer_ok_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        await RawServer.read_request_from(reader)
        writer.write(OK)


async def test_a_request_goes_out_as_written_and_the_connection_is_reused() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.read_request(reader)
            writer.write(OK)

    async with RawServer(handler) as server, pool() as upstream:
        for _ in range(3):
            response = await post(upstream, server.url)
            assert (response.status, response.content_type, await read_all(response)) == (
                200,
                b"application/json",
                b"{}",
            )
            assert response.at_eof()
        assert server.connections == 1
        assert upstream.idle_connections() == 1
    host = server.url.removeprefix("http://").encode()
    assert server.requests[0] == (
        b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nhost: " + host + b"\r\ncontent-type: application/json\r\n"
        b"x-request-id: r1\r\ncontent-length: 13\r\n\r\n" + b'{"model":"m"}'
    )


async def test_idle_connections_close_after_the_keepalive() -> None:
    async with RawServer.replying(OK) as server, pool(keepalive=0.2) as upstream:
        await read_all(await post(upstream, server.url))
        assert (upstream.idle_connections(), upstream.open_connections(), upstream.origins()) == (1, 1, 1)
        await asyncio.sleep(0.5)
        assert server.open == 0
        # nothing is kept for a backend without connections: pods come and go for months
        assert (upstream.idle_connections(), upstream.open_connections(), upstream.origins()) == (0, 0, 0)


async def test_a_backend_that_cannot_be_reached_leaves_nothing_behind() -> None:
    async with RawServer(answer_ok_forever) as server:
        gone = server.url
    async with pool() as upstream:
        for _ in range(3):
            with pytest.raises(ConnectFailed):
                await post(upstream, gone)
        assert upstream.origins() == 0


async def test_a_kept_alive_connection_the_backend_closed_is_replaced_without_an_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(OK)
        await writer.drain()
        if server.connections == 1:
            # keep the first connection open, read the next request and hang up without an answer,
            # as a backend does that closes an idle connection while a request is on its way
            with contextlib.suppress(asyncio.IncompleteReadError):
                await reader.readuntil(b"\r\n\r\n")
            return
        while True:  # later connections serve on
            await server.read_request(reader)
            writer.write(OK)

    async with RawServer(handler) as server, pool() as upstream:
        await read_all(await post(upstream, server.url))
        response = await post(upstream, server.url)
        assert await read_all(response) == b"{}"
        assert server.connections == 2
        # the new connection is the pool's like any other: counted, reused, closed with the pool
        assert (upstream.open_connections(), upstream.idle_connections()) == (1, 1)
        await read_all(await post(upstream, server.url))
        assert server.connections == 2
    await asyncio.sleep(0.1)
    assert server.open == 0


async def test_a_backend_behind_a_path_gets_its_prefix() -> None:
    async with RawServer.replying(OK) as server, pool() as upstream:
        await read_all(await post(upstream, server.url + "/team-a/llama/"))
    assert server.requests[0].startswith(b"POST /team-a/llama/v1/chat/completions?x=1 HTTP/1.1\r\n")


async def test_the_answer_to_head_has_no_body_and_its_connection_is_not_reused() -> None:
    async with (
        RawServer.replying(b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 31\r\nallow: GET\r\n\r\n") as server,
        pool() as upstream,
    ):
        response = await upstream.request(server.url, b"HEAD", b"/v1/responses/r1", [], b"", 5.0)
        assert (response.status, await response.readany(idle_limit=1.0), response.complete) == (405, b"", True)
        assert upstream.idle_connections() == 0
    assert server.requests[0].startswith(b"HEAD /v1/responses/r1 HTTP/1.1\r\n")
    assert b"content-length" not in server.requests[0]


async def test_a_head_that_came_while_the_loop_was_busy_is_not_timed_out() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n6\r\ndata: \r\n")
        await writer.drain()
        time.sleep(0.4)  # noqa: ASYNC251 -- blocks the loop past the 0.2 s deadline, the head on its way
        await asyncio.sleep(0.05)
        writer.write(b"4\r\nrest\r\n0\r\n\r\n")
        await reader.read()

    async with RawServer(handler) as server, pool() as upstream:
        response = await post(upstream, server.url, head_timeout=0.2)
        assert await read_all(response) == b"data: rest"


async def test_chunked_bodies_arrive_chunk_by_chunk_and_interim_answers_are_skipped() -> None:
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n")
        writer.write(b"transfer-encoding: chunked\r\n\r\n6\r\ndata: \r\n")
        await writer.drain()
        await release.wait()
        writer.write(b"4\r\none\n\r\n0\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with RawServer(handler) as server, pool() as upstream:
        response = await post(upstream, server.url)
        assert response.status == 200
        assert response.content_type == b"text/event-stream"
        assert await response.readany() == b"data: "
        assert not response.at_eof()
        release.set()
        assert await read_all(response) == b"one\n"
        assert upstream.idle_connections() == 1


async def test_a_body_without_length_ends_with_the_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it")

    async with RawServer(handler) as server, pool() as upstream:
        response = await post(upstream, server.url)
        assert await read_all(response) == b"all of it"
        assert response.complete
        assert upstream.idle_connections() == 0


async def test_failures_before_the_request_could_be_read_are_connect_failures() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)

    async with RawServer(hang_up) as server, pool() as upstream:
        with pytest.raises(ConnectFailed, match="as the request went out"):
            await post(upstream, server.url)
        closed_port = server.url
    async with pool() as upstream:
        with pytest.raises(ConnectFailed, match="connect failed"):
            await post(upstream, closed_port)


async def test_a_backend_that_worked_on_the_request_and_closed_is_not_sent_it_again() -> None:
    """A POST the backend read and worked on before it closed without an answer (it crashed, say) may have
    been run: the pool does not send it to that backend again, on a new connection or a kept-alive one (the
    attempts stage may try another), and the failure says it was reached."""

    async def work_then_hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        if len(server.requests) == 1:  # the first answer keeps the connection for the pool
            writer.write(OK)
            await writer.drain()
            await server.read_request(reader)
        await asyncio.sleep(UNREAD_S * 3)

    async with RawServer(work_then_hang_up) as server, pool() as upstream:
        await read_all(await post(upstream, server.url))
        with pytest.raises(Unanswered, match="closed the connection without answering"):
            await post(upstream, server.url)  # on the kept-alive connection
        assert len(server.requests) == 2
        with pytest.raises(Unanswered, match="closed the connection without answering"):
            await post(upstream, server.url)  # on a new one
        assert len(server.requests) == 3


async def test_an_answer_s_trailers_are_not_its_headers() -> None:
    """Fields after a chunked body are no headers: they can neither add to the head the client gets nor
    change the content type that decides how the body is read."""
    answer = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
        b"2;ext=1\r\n{}\r\n0\r\nx-trailer: v\r\ncontent-type: text/event-stream\r\n\r\n"
    )
    async with RawServer.replying(answer) as server, pool() as upstream:
        response = await post(upstream, server.url)
        assert await read_all(response) == b"{}"
        assert response.content_type == b"application/json"
        assert [name for name, _ in response.raw_headers] == [b"content-type", b"transfer-encoding"]


async def test_bytes_that_are_not_http_are_a_bad_response() -> None:
    async with RawServer.replying(b"SSH-2.0-OpenSSH_9.6\r\n\r\n") as server, pool() as upstream:
        with pytest.raises(BadResponse, match="the backend answered with invalid HTTP"):
            await post(upstream, server.url)


async def test_a_body_without_length_cut_by_a_reset_is_broken_not_complete() -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\npart")
        await writer.drain()
        await asyncio.sleep(0.1)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset
        writer.transport.abort()

    async with RawServer(reset) as server, pool() as upstream:
        response = await post(upstream, server.url)
        assert await response.readany() == b"part"
        with pytest.raises(BodyBroken):
            await response.readany()
        assert not response.complete


async def test_a_body_cut_short_raises_after_the_bytes_that_came() -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")

    async with RawServer(cut) as server, pool() as upstream:
        response = await post(upstream, server.url)
        assert await response.readany() == b"partial"
        with pytest.raises(BodyBroken, match="mid-response"):
            await response.readany()


async def test_cancelling_while_the_backend_works_closes_the_connection() -> None:
    gone = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        await reader.read()  # returns when the client hangs up
        gone.set()

    async with RawServer(slow) as server, pool() as upstream:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await post(upstream, server.url)
        await asyncio.wait_for(gone.wait(), 2)
        assert upstream.idle_connections() == 0


async def test_a_late_head_times_out_and_the_backend_is_told() -> None:
    gone = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        await reader.read()
        gone.set()

    async with RawServer(slow) as server, pool() as upstream:
        with pytest.raises(HeadTimeout, match=r"no response within 0\.2 s"):
            await post(upstream, server.url, head_timeout=0.2)
        await asyncio.wait_for(gone.wait(), 2)


async def test_a_stalled_body_times_out_only_while_waiting_on_the_backend() -> None:
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\none\r\n")
        await asyncio.sleep(0.4)
        writer.write(b"3\r\ntwo\r\n")
        await reader.read()

    async with RawServer(stall) as server, pool() as upstream:
        response = await post(upstream, server.url)
        await asyncio.sleep(0.6)  # a slow reader: "two" is buffered by now, so no timeout applies
        assert await response.readany(idle_limit=0.1) == b"onetwo"
        with pytest.raises(IdleTimeout, match=r"nothing for 0\.1 s"):
            await response.readany(idle_limit=0.1)
        response.close()


async def test_the_idle_limit_applies_to_each_wait_of_a_steady_stream() -> None:
    """One timer serves every wait: chunks 0.1 s apart never trip a 0.25 s limit, however long the stream runs
    (the first wait's deadline has long passed), and the first gap longer than the limit trips it on time."""

    async def steady_then_stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(8):
            await asyncio.sleep(0.1)
            writer.write(b"1\r\nx\r\n")
        await reader.read()

    async with RawServer(steady_then_stall) as server, pool() as upstream:
        response = await post(upstream, server.url)
        received = b""
        while len(received) < 8:
            received += await response.readany(idle_limit=0.25)
        assert received == b"x" * 8
        waited = time.monotonic()
        with pytest.raises(IdleTimeout, match=r"nothing for 0\.25 s"):
            await response.readany(idle_limit=0.25)
        assert 0.2 <= time.monotonic() - waited < 1.0  # the stall's own deadline, not an earlier wait's
        response.close()


async def test_a_finished_response_leaves_no_idle_timer_behind() -> None:
    async def late_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        await asyncio.sleep(0.05)  # the reader waits on the body: its idle timer is armed
        writer.write(b"{}")
        await reader.read()

    async with RawServer(late_body) as server, pool() as upstream:
        response = await post(upstream, server.url)
        assert await response.readany(idle_limit=300.0) == b"{}"
        assert response.complete
        assert response._idle_timer is None  # a 300 s timer left per request would pile up under load


async def test_closing_a_response_mid_body_aborts_its_connection() -> None:
    gone = asyncio.Event()

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        try:
            while True:
                writer.write(b"5\r\nhello\r\n")
                await writer.drain()
                await asyncio.sleep(0.01)
        except ConnectionError:
            gone.set()

    async with RawServer(endless) as server, pool() as upstream:
        response = await post(upstream, server.url)
        assert await response.readany()
        response.close()
        await asyncio.wait_for(gone.wait(), 2)
        with pytest.raises(BodyBroken):
            await response.readany()
        assert upstream.idle_connections() == 0


async def test_a_reader_that_falls_behind_pauses_the_backend() -> None:
    sent = 0

    async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        block = b"x" * 65536
        while True:
            writer.write(b"%x\r\n%s\r\n" % (len(block), block))
            await writer.drain()
            sent += len(block)

    async with RawServer(firehose) as server, pool() as upstream:
        response = await post(upstream, server.url)
        await asyncio.sleep(0.5)  # read nothing: the client pauses, then the kernel buffers fill
        before = sent
        await asyncio.sleep(0.3)
        assert sent == before, "the backend kept writing while the reader was paused"
        # what the client holds is bounded by the pause threshold plus one socket read, not by what the
        # backend could send
        assert HIGH_WATER <= len(response.read_nowait()) < HIGH_WATER + 1024 * 1024
        await asyncio.sleep(0.2)
        assert sent > before, "reading did not resume the flow"
        response.close()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A self-signed certificate for 127.0.0.1, key included (cert.pem, key.pem)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed")
    folder = tmp_path_factory.mktemp("tls")
    subject = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    files = ["-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem")]
    command = [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", *subject, *files]
    subprocess.run(command, check=True, capture_output=True)
    return folder


async def test_an_https_backend_is_reached_with_its_certificate_verified(
    certificate: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(certificate / "cert.pem", certificate / "key.pem")

    async with RawServer.replying(OK, tls) as server:
        async with pool() as untrusting:  # the system's CAs do not know this certificate
            with pytest.raises(ConnectFailed, match="CERTIFICATE_VERIFY_FAILED"):
                await post(untrusting, server.url)
        monkeypatch.setenv("SSL_CERT_FILE", str(certificate / "cert.pem"))  # how a private CA is trusted
        async with pool() as trusting:
            response = await post(trusting, server.url)
            assert (response.status, await read_all(response)) == (200, b"{}")
    assert server.requests[-1].startswith(b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nhost: 127.0.0.1:")


async def test_a_request_cancelled_as_its_connection_is_made_leaves_the_pool_balanced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Cancelled after the socket connected but before create_connection() returned: asyncio then closes the new
    transport (connection_lost runs) and the cancellation reaches _connect too. The origin's count of open
    connections must drop once, not twice: twice would forget the origin while another of its connections is
    still in use, and that connection could never be reused."""
    made = upstream_module._Connection.connection_made
    victims: list[asyncio.Future[UpstreamResponse]] = []

    def made_then_cancelled(self: upstream_module._Connection, transport: asyncio.BaseTransport) -> None:
        made(self, transport)
        if victims:
            victims.pop().cancel()  # the requesting task, while create_connection still awaits its waiter

    async def stream_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await RawServer.read_request_from(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        await reader.read()

    async with RawServer(stream_forever) as server, pool() as upstream:
        streaming = await post(upstream, server.url)  # holds a connection of the origin, in use
        monkeypatch.setattr(upstream_module._Connection, "connection_made", made_then_cancelled)
        task = asyncio.ensure_future(post(upstream, server.url))
        victims.append(task)
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(10):
            await asyncio.sleep(0.01)  # let connection_lost run
        assert upstream.open_connections() == 1
        assert upstream.origins() == 1
        streaming.close()
        for _ in range(10):
            await asyncio.sleep(0.01)
        assert upstream.open_connections() == 0
        assert upstream.origins() == 0


async def test_idle_connections_beyond_the_cap_are_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream_module, "MAX_IDLE_PER_ORIGIN", 2)
    async with RawServer(answer_ok_forever) as server, pool() as upstream:
        responses = await asyncio.gather(*(post(upstream, server.url) for _ in range(5)))
        for response in responses:
            assert await read_all(response) == b"{}"
        for _ in range(10):
            await asyncio.sleep(0.01)
        assert server.connections == 5
        assert upstream.idle_connections() == 2
        assert upstream.open_connections() == 2
        assert server.open == 2  # the three beyond the cap were closed, not leaked
        for response in await asyncio.gather(*(post(upstream, server.url) for _ in range(2))):
            await read_all(response)
        assert server.connections == 5  # the two kept were reused
