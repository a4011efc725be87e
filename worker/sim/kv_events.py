"""vLLM's KV cache events: the msgpack wire layout and the `--kv-events-config` settings.

The structs mirror vLLM 0.32's `vllm/distributed/kv_events.py` field for field, in the same order and with the
same msgspec options, so `msgspec.msgpack` encodes them to the same bytes: a batch is an array
`[ts, [event, ...], data_parallel_rank]`; an event is a map tagged `"type": "<class name>"` with every field
that has no default, and the defaulted ones only when set (`omit_defaults`). Written here (the simulator never
imports vLLM), checked against batches captured from vLLM 0.32 on the CPU build.

`KVEventsSettings` takes the same JSON keys as vLLM's `KVEventsConfig` (extra keys are an error there too).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any

import msgspec

from worker.sim.errors import ConfigError

MEDIUM_GPU = "GPU"
SPEC_KIND_FULL_ATTENTION = "full_attention"  # what vLLM stamps on a full-attention model's BlockStored


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    """Base class of the events; `tag=True` puts `"type": "<class name>"` in each map."""


class BlockStored(KVCacheEvent):
    block_hashes: list[int]
    parent_block_hash: int | None
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
    block_hashes: list[int]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared

_TCP = re.compile(r"^tcp://(?P<host>\*|\[[^\]]*\]|[^:/\[\]]+):(?P<port>\d+)$")


def _check_endpoint(key: str, endpoint: str) -> None:
    if endpoint.startswith(("ipc://", "inproc://")) and len(endpoint.split("://", 1)[1]) > 0:
        return
    match = _TCP.match(endpoint)
    if match is None or not 0 <= int(match["port"]) <= 65535:
        raise ConfigError(
            f"--kv-events-config: {key} {endpoint!r} is not a ZMQ endpoint (tcp://HOST:PORT, ipc://PATH, inproc://NAME)"
        )


def offset_endpoint(endpoint: str | None, offset: int) -> str | None:
    """The endpoint of server `offset` under `--count`: a tcp port grows by `offset` (0 stays 0, any free port);
    an ipc/inproc name gets the suffix `_<offset>`."""
    if endpoint is None or offset == 0:
        return endpoint
    match = _TCP.match(endpoint)
    if match is None:
        return f"{endpoint}_{offset}"
    port = int(match["port"])
    return endpoint if port == 0 else f"tcp://{match['host']}:{port + offset}"


@dataclass(frozen=True)
class KVEventsSettings:
    """vLLM's KVEventsConfig: same keys, defaults and meaning."""

    enable_kv_cache_events: bool = False
    publisher: str | None = None  # "null" | "zmq"; unset: "zmq" when events are enabled, else "null"
    endpoint: str = "tcp://*:5557"  # PUB socket: bound when it has a wildcard host (* or ::) or is ipc/inproc
    replay_endpoint: str | None = None  # ROUTER socket for replay requests, always bound
    buffer_steps: int = 10_000  # batches kept for replay
    hwm: int = 100_000  # ZMQ send high-water mark of the PUB socket
    max_queue_size: int = 100_000  # accepted as vLLM's; the simulator sends each batch at once, without a queue
    topic: str = ""

    def __post_init__(self) -> None:
        if self.publisher is None:
            object.__setattr__(self, "publisher", "zmq" if self.enable_kv_cache_events else "null")
        if self.publisher not in ("null", "zmq"):
            raise ConfigError(f"--kv-events-config: publisher must be 'null' or 'zmq', got {self.publisher!r}")
        _check_endpoint("endpoint", self.endpoint)
        if self.replay_endpoint is not None:
            _check_endpoint("replay_endpoint", self.replay_endpoint)
        for name in ("buffer_steps", "max_queue_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--kv-events-config: {name} must be >= 1, got {getattr(self, name)}")
        if self.hwm < 0:
            raise ConfigError(f"--kv-events-config: hwm must be >= 0, got {self.hwm}")

    @property
    def publishing(self) -> bool:
        return self.enable_kv_cache_events and self.publisher == "zmq"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> KVEventsSettings:
        return dataclasses.replace(self, **changes)

    def for_server(self, index: int) -> KVEventsSettings:
        """The settings of server `index` of `--count` (see `offset_endpoint`)."""
        return self.replace(
            endpoint=offset_endpoint(self.endpoint, 2 * index),
            replay_endpoint=offset_endpoint(self.replay_endpoint, 2 * index),
        )


_TYPES: dict[str, tuple[type, ...]] = {
    "enable_kv_cache_events": (bool,),
    "publisher": (str, type(None)),
    "endpoint": (str,),
    "replay_endpoint": (str, type(None)),
    "buffer_steps": (int,),
    "hwm": (int,),
    "max_queue_size": (int,),
    "topic": (str,),
}


def parse_kv_events_config(raw: str) -> KVEventsSettings:
    """`--kv-events-config '<json>'` as vLLM reads it; a bad document is a `ConfigError` naming the key."""
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--kv-events-config: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError("--kv-events-config: must be a JSON object")
    unknown = sorted(set(data) - set(_TYPES))
    if unknown:
        raise ConfigError(f"--kv-events-config: unknown key(s) {', '.join(unknown)} (known: {', '.join(_TYPES)})")
    for key, value in data.items():
        types = _TYPES[key]
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            want = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise ConfigError(f"--kv-events-config: {key} must be {want}, got {json.dumps(value)}")
    return KVEventsSettings(**data)
