"""Decoding vLLM's KV event batches and /kv_event_sources answers, byte for byte as vLLM 0.32 sends them.

The payloads are msgpack of the layout captured from the real CPU worker: an array [ts, [events], rank] whose
events are maps tagged by "type" (with LoRA, extra_keys holds the adapter's name per block)."""

from __future__ import annotations

import msgspec
import pytest

from gateway.fleet.kv_protocol import (
    END_SEQ,
    AllBlocksCleared,
    BadEvents,
    BlockRemoved,
    BlockStored,
    KvSource,
    decode_batch,
    decode_seq,
    encode_seq,
    parse_sources,
    with_host,
)

STORED = {
    "type": "BlockStored",
    "block_hashes": [4389458614358947501, 5898224128632940012],
    "parent_block_hash": None,
    "token_ids": list(range(256)),
    "block_size": 128,
    "lora_id": None,
    "medium": "GPU",
    "lora_name": None,
    "extra_keys": [None, None],
    "group_idx": 0,
    "kv_cache_spec_kind": "full_attention",
}


def payload(*events: object, ts: float = 1796166352.95) -> bytes:
    return msgspec.msgpack.encode([ts, list(events), 0])


def test_a_batch_as_vllm_publishes_it() -> None:
    lora = {**STORED, "lora_id": 1, "lora_name": "lora-a", "extra_keys": [["lora-a"], ["lora-a"]]}
    removed = {"type": "BlockRemoved", "block_hashes": [5898224128632940012], "medium": "GPU"}
    batch = decode_batch(payload(STORED, lora, removed, {"type": "AllBlocksCleared"}))
    assert batch.ts == 1796166352.95
    assert batch.unknown == 0
    stored, adapter, gone, cleared = batch.events
    assert isinstance(stored, BlockStored)
    assert stored.block_hashes == STORED["block_hashes"]
    assert stored.parent_block_hash is None
    assert (len(stored.token_ids), stored.block_size, stored.medium, stored.group_idx) == (256, 128, "GPU", 0)
    assert isinstance(adapter, BlockStored)
    assert adapter.lora_name == "lora-a"
    assert adapter.extra_keys == [("lora-a",), ("lora-a",)]
    assert isinstance(gone, BlockRemoved)
    assert gone.block_hashes == [5898224128632940012]
    assert isinstance(cleared, AllBlocksCleared)


def test_digest_hashes_and_omitted_defaults_decode_too() -> None:
    event = {"type": "BlockStored", "block_hashes": [b"\x01" * 32], "parent_block_hash": b"\x02" * 32,
             "token_ids": [1] * 16, "block_size": 16, "lora_id": None, "medium": None, "lora_name": None}  # fmt: skip
    (stored,) = decode_batch(msgspec.msgpack.encode([0.0, [event]])).events  # no rank: omitted as the default
    assert isinstance(stored, BlockStored)
    assert stored.block_hashes == [b"\x01" * 32]
    assert stored.extra_keys is None


def test_an_unknown_event_type_is_skipped_not_fatal() -> None:
    batch = decode_batch(payload({"type": "BlockTouched", "block_hashes": [1]}, STORED))
    assert batch.unknown == 1
    assert [type(event) for event in batch.events] == [BlockStored]


@pytest.mark.parametrize("raw", [b"", b"\x93", msgspec.msgpack.encode({"ts": 1}), msgspec.msgpack.encode([1.0, 5])])
def test_what_is_not_a_batch_is_refused(raw: bytes) -> None:
    with pytest.raises(BadEvents):
        decode_batch(raw)


def test_sequence_numbers_and_the_replay_end_marker() -> None:
    assert decode_seq(b"\x00" * 7 + b"\x05") == 5
    assert encode_seq(5) == b"\x00" * 7 + b"\x05"
    assert decode_seq(END_SEQ) == -1
    with pytest.raises(BadEvents):
        decode_seq(b"\x00")


def test_sources_as_vllm_lists_them_with_the_wildcard_host_replaced() -> None:
    answer = {
        "0": {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "tcp://*:21557",
              "replay_endpoint": "tcp://*:21558", "buffer_steps": 10000, "hwm": 100000, "max_queue_size": 100000,
              "topic": ""},
        "1": {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "tcp://10.0.0.9:21558",
              "replay_endpoint": None, "topic": "kv"},
        "2": {"enable_kv_cache_events": False, "publisher": "null", "endpoint": "tcp://*:1"},
    }  # fmt: skip
    assert parse_sources(answer, "10.1.2.3") == [
        KvSource("tcp://10.1.2.3:21557", "tcp://10.1.2.3:21558", "", 0),
        KvSource("tcp://10.0.0.9:21558", None, "kv", 1),
    ]
    assert parse_sources({}, "h") == []
    with pytest.raises(BadEvents):
        parse_sources([], "h")


def test_with_host() -> None:
    assert with_host("tcp://*:5557", "worker-0") == "tcp://worker-0:5557"
    assert with_host("tcp://0.0.0.0:5557", "10.0.0.1") == "tcp://10.0.0.1:5557"
    assert with_host("tcp://[::]:5557", "fd00::1") == "tcp://[fd00::1]:5557"
    assert with_host("tcp://10.0.0.2:5557", "10.0.0.1") == "tcp://10.0.0.2:5557"  # a real address stays
    assert with_host("ipc:///tmp/kv", "h") == "ipc:///tmp/kv"
