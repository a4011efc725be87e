"""A small KV-cache-event client for the conformance suite: subscribe, replay and decode vLLM's ZMQ events.

The structs below are written from vLLM 0.32's `vllm/distributed/kv_events.py` (field order, `array_like` batch,
tagged map events, `omit_defaults`) independently of the simulator's, so decoding the simulator with them
checks its wire format. One module on purpose: the gateway's own subscriber is meant to replace it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import msgspec
import zmq

END_SEQ = -1


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class BlockStored(KVCacheEvent):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int | bytes]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


_DECODER = msgspec.msgpack.Decoder(KVEventBatch)


def decode(payload: bytes) -> KVEventBatch:
    return _DECODER.decode(payload)


@dataclass(frozen=True)
class Message:
    topic: bytes
    seq: int
    batch: KVEventBatch


def connect_address(endpoint: str, server_url: str) -> str:
    """Where a client connects for an endpoint the server reports (a wildcard host means the server's host)."""
    host = urlsplit(server_url).hostname or "127.0.0.1"
    for wildcard in ("tcp://*:", "tcp://0.0.0.0:", "tcp://[::]:"):
        if endpoint.startswith(wildcard):
            return f"tcp://{host}:{endpoint[len(wildcard) :]}"
    return endpoint


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
            out.append(Message(topic, int.from_bytes(seq, "big"), decode(payload)))
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
            if int.from_bytes(seq, "big", signed=True) == END_SEQ:
                assert topic == b""
                assert payload == b""
                return out, True
            out.append(Message(topic, int.from_bytes(seq, "big"), decode(payload)))
        return out, False
    finally:
        sock.close(linger=0)
