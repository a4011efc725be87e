"""A small KV-cache-event client for the conformance suite: subscribe, replay and decode vLLM's ZMQ events.

Decoding is the gateway's own (gateway/fleet/kv_protocol.py): the same code reads the simulator here and the
real vLLM worker in the e2e suite, so both are checked against what the gateway consumes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import zmq

from gateway.fleet.kv_protocol import (
    END_SEQ,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    decode_batch,
    decode_seq,
    with_host,
)

__all__ = ["AllBlocksCleared", "BlockRemoved", "BlockStored", "EventBatch", "Message", "Subscriber", "replay"]


def decode(payload: bytes) -> EventBatch:
    batch = decode_batch(payload)
    assert batch.unknown == 0, "an event type the gateway does not know"
    return batch


@dataclass(frozen=True)
class Message:
    topic: bytes
    seq: int
    batch: EventBatch


def connect_address(endpoint: str, server_url: str) -> str:
    """Where a client connects for an endpoint the server reports (a wildcard host means the server's host)."""
    return with_host(endpoint, urlsplit(server_url).hostname or "127.0.0.1")


class Subscriber:
    """A SUB socket on a publisher; `messages()` collects what arrives."""

    def __init__(self, address: str, topic: bytes = b"") -> None:
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SUBSCRIBE, topic)
        self._sock.connect(address)

    def messages(self, timeout: float = 2.0, until: Any = None) -> list[Message]:
        """Messages until none arrives for `timeout` s, or until `until(collected)` is true."""
        out: list[Message] = []
        while self._sock.poll(int(timeout * 1000)):
            topic, seq, payload = self._sock.recv_multipart()
            out.append(Message(topic, decode_seq(seq), decode(payload)))
            if until is not None and until(out):
                break
        return out

    def close(self) -> None:
        self._sock.close(linger=0)


def replay(address: str, start_seq: int, timeout: float = 5.0) -> tuple[list[Message], bool]:
    """Ask the replay socket for every buffered batch from `start_seq`; (batches, whether the end marker came)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(address)
        sock.send_multipart([b"", start_seq.to_bytes(8, "big")])
        out: list[Message] = []
        while sock.poll(int(timeout * 1000)):
            frames = sock.recv_multipart()
            assert len(frames) == 4, frames[:2]
            assert frames[0] == b"", frames[:2]
            _, topic, seq, payload = frames
            if seq == END_SEQ:
                assert topic == b""
                assert payload == b""
                return out, True
            out.append(Message(topic, decode_seq(seq), decode(payload)))
        return out, False
    finally:
        sock.close(linger=0)
