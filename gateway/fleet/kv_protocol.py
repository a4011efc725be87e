"""vLLM's KV cache events on the wire, as vllm/distributed/kv_events.py publishes them (vLLM 0.32).

The PUB socket sends multipart messages `[topic, seq, payload]`: `seq` an 8-byte big-endian counter that
starts at 0 when the engine starts, `payload` msgpack of an EventBatch, an array `[ts, events, dp_rank]`.
Each event is a map tagged by its `type`: BlockStored, BlockRemoved or AllBlocksCleared. The ROUTER replay
socket answers a request `[b"", start_seq]` with `[b"", topic, seq, payload]` for every batch it still holds
from `start_seq` on, then `[b"", b"", END_SEQ, b""]`.

Only the fields routing needs are declared; unknown fields (newer vLLM releases add some) are ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

BlockHash = int | bytes  # 64-bit ints by default (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES), else digests
END_SEQ = (-1).to_bytes(8, "big", signed=True)  # the replay's end marker


class BlockStored(msgspec.Struct, tag=True, gc=False):
    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None


class BlockRemoved(msgspec.Struct, tag=True, gc=False):
    block_hashes: list[BlockHash]
    medium: str | None = None
    group_idx: int | None = None


class AllBlocksCleared(msgspec.Struct, tag=True, gc=False):
    pass


KvEvent = BlockStored | BlockRemoved | AllBlocksCleared


class _RawBatch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[msgspec.Raw]
    data_parallel_rank: int | None = None


@dataclass(frozen=True, slots=True)
class EventBatch:
    ts: float  # the engine's wall clock when it published the batch
    events: list[KvEvent]
    unknown: int  # events of a type this gateway does not know (a newer vLLM's): skipped
    data_parallel_rank: int | None = None


_batch_decoder = msgspec.msgpack.Decoder(_RawBatch)
_event_decoder = msgspec.msgpack.Decoder(KvEvent)


class BadEvents(ValueError):
    """A message that is not a KV event batch."""


def decode_batch(payload: bytes) -> EventBatch:
    try:
        raw = _batch_decoder.decode(payload)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
        raise BadEvents(str(exc)) from None
    events: list[KvEvent] = []
    unknown = 0
    for item in raw.events:
        try:
            events.append(_event_decoder.decode(item))
        except msgspec.ValidationError:
            unknown += 1  # an event type (or a field's type) this gateway does not know
        except msgspec.DecodeError as exc:
            raise BadEvents(str(exc)) from None
    return EventBatch(raw.ts, events, unknown, raw.data_parallel_rank)


def decode_seq(frame: bytes) -> int:
    if len(frame) != 8:
        raise BadEvents(f"a sequence number is 8 bytes, not {len(frame)}")
    return int.from_bytes(frame, "big", signed=True)


def encode_seq(seq: int) -> bytes:
    return seq.to_bytes(8, "big", signed=True)


@dataclass(frozen=True, slots=True)
class KvSource:
    """Where one engine (one data-parallel rank) publishes: ZMQ endpoints, ready to connect to."""

    endpoint: str
    replay_endpoint: str | None = None
    topic: str = ""
    rank: int = 0


WILDCARD_HOSTS = frozenset({"*", "0.0.0.0", "::", "[::]", ""})


def with_host(endpoint: str, host: str) -> str:
    """`tcp://*:5557` as published by an engine bound to every address -> `tcp://HOST:5557`."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep or scheme != "tcp":
        return endpoint
    address, colon, port = rest.rpartition(":")
    if not colon or address not in WILDCARD_HOSTS:
        return endpoint
    bracketed = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"tcp://{bracketed}:{port}"


def parse_sources(payload: Any, host: str) -> list[KvSource]:
    """The sources in a `GET /kv_event_sources` answer: `{rank: KVEventsConfig}` for the ranks that publish
    over ZMQ. Wildcard hosts are replaced by the backend's own `host`."""
    if not isinstance(payload, Mapping):
        raise BadEvents("/kv_event_sources did not answer a JSON object")
    sources = []
    for rank, config in payload.items():
        if not isinstance(config, Mapping) or not config.get("enable_kv_cache_events"):
            continue
        if config.get("publisher", "zmq") != "zmq" or not isinstance(config.get("endpoint"), str):
            continue
        replay = config.get("replay_endpoint")
        topic = config.get("topic") or ""
        try:
            number = int(rank)
        except (TypeError, ValueError):
            raise BadEvents(f"/kv_event_sources: {rank!r} is not a rank") from None
        sources.append(
            KvSource(
                endpoint=with_host(config["endpoint"], host),
                replay_endpoint=with_host(replay, host) if isinstance(replay, str) else None,
                topic=topic if isinstance(topic, str) else "",
                rank=number,
            )
        )
    return sorted(sources, key=lambda source: source.rank)
