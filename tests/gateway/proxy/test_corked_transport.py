"""CorkedTransport over a real socket pair: a response's first writes leave in one write, later ones at once,
in order, and nothing written is lost on close."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.proxy.corked_transport import CorkedTransport


class CountingTransport:
    """The real socket transport, with each write it is given recorded (what the syscalls would carry)."""

    def __init__(self, inner: asyncio.Transport) -> None:
        self.inner = inner
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self.inner.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class Pair:
    def __init__(self, counting: CountingTransport, corked: CorkedTransport, peer: socket.socket) -> None:
        self.counting = counting
        self.corked = corked
        self.peer = peer

    async def received(self, size: int) -> bytes:
        loop = asyncio.get_running_loop()
        data = b""
        while len(data) < size:
            chunk = await loop.sock_recv(self.peer, 65536)
            if not chunk:
                break
            data += chunk
        return data


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    loop = asyncio.get_running_loop()
    ours, peer = socket.socketpair()
    peer.setblocking(False)
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
    counting = CountingTransport(transport)
    corked = CorkedTransport(counting, loop)  # type: ignore[arg-type]
    yield Pair(counting, corked, peer)
    transport.close()
    peer.close()


async def test_a_response_head_and_body_written_in_one_iteration_leave_in_one_write(pair: Pair) -> None:
    pair.corked.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    pair.corked.write(b"{}")
    assert pair.counting.writes == []  # held until the iteration's callbacks have run
    await asyncio.sleep(0)
    assert pair.counting.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
    expected = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"
    assert await pair.received(len(expected)) == expected


async def test_after_the_first_write_stream_chunks_go_straight_through(pair: Pair) -> None:
    pair.corked.write(b"head")
    await asyncio.sleep(0)
    pair.corked.write(b"data: 1\n\n")
    assert pair.counting.writes == [b"head", b"data: 1\n\n"]  # no wait for the iteration's end
    pair.corked.writelines([b"data: 2\n\n", b"data: [DONE]\n\n"])
    assert pair.counting.writes[2:] == [b"data: 2\n\n", b"data: [DONE]\n\n"]
    expected = b"headdata: 1\n\ndata: 2\n\ndata: [DONE]\n\n"
    assert await pair.received(len(expected)) == expected


async def test_cork_holds_the_next_responses_first_writes_again(pair: Pair) -> None:
    pair.corked.write(b"first")
    await asyncio.sleep(0)
    pair.corked.cork()
    pair.corked.write(b"second head ")
    pair.corked.write(bytearray(b"second body"))
    assert pair.corked.get_write_buffer_size() == len(b"second head second body")
    await asyncio.sleep(0)
    assert pair.counting.writes == [b"first", b"second head second body"]


async def test_close_sends_what_was_held_first(pair: Pair) -> None:
    pair.corked.write(b"last words")
    pair.corked.close()
    assert pair.counting.writes == [b"last words"]
    assert await pair.received(100) == b"last words"  # then EOF
    await asyncio.sleep(0)  # the scheduled flush finds nothing left to send
    assert pair.counting.writes == [b"last words"]


async def test_abort_drops_what_was_held(pair: Pair) -> None:
    pair.corked.write(b"never sent")
    pair.corked.abort()
    await asyncio.sleep(0)
    assert pair.counting.writes == []
    assert pair.corked.is_closing()
