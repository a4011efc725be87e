"""The precise prefix index: which prompt blocks each backend's engine holds, from its KV cache events.

Every BlockStored event carries the blocks' token ids: their keys are chained from the parent block's key
(found through the engine's hash of the parent) exactly as a request's keys are (block_keys.py), so a request
and an event agree whatever hash function or seed the engine uses. BlockRemoved names engine hashes only:
each backend keeps the map from its engine's hashes to the gateway's keys.

A backend's state says how far its blocks can be trusted:
- `live`: every event since the engine started (or since its cache was cleared) was applied;
- `rebuilding`: events were lost. Its blocks were dropped, never kept as stale truth, and new events add
  blocks again; what it held before the loss is unknown until it has stored a whole cache's worth of blocks
  since (by then the engine must have evicted the rest), or cleared its cache, or restarted;
- `unknown`: nothing is known (not subscribed, or its engine is down).
Routing treats the blocks of a backend that is not live as a lower bound and falls back to its guesses.

Blocks on their way: an engine announces a prompt's blocks only once it has computed them, a prefill (and
its queue) after the gateway routed the request. A burst of requests for one prefix that arrived in that window
would find no holder and be spread over backends, each computing the prefix again and evicting other prefixes.
So the blocks of each request the gateway routed to a backend (`routed`) count as held there
(`match_routed`) while its prefill runs, and after it (`settled`) until the events confirm them or
`SETTLE_SECONDS` pass (an engine that reports nothing by then stored nothing new: the blocks were already
held, or the request failed).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from gateway.fleet.kv_protocol import AllBlocksCleared, BlockHash, BlockRemoved, BlockStored, KvEvent
from gateway.routing.block_holders import BlockHolders
from gateway.routing.block_keys import chain_root, next_key

SETTLE_SECONDS = 1.0  # after a routed request's prefill, how long its blocks count as held with no event


class CacheState(enum.Enum):
    LIVE = "live"
    REBUILDING = "rebuilding"
    UNKNOWN = "unknown"


@dataclass(eq=False, slots=True)
class _Source:
    """One engine (data-parallel rank) of a backend: its hashes mapped to the gateway's keys."""

    keys: dict[BlockHash, int] = field(default_factory=dict)
    synced: bool = False  # its events since the engine started are all applied


@dataclass(eq=False, slots=True)
class BackendBlocks:
    url: str
    state: CacheState = CacheState.UNKNOWN
    block_size: int | None = None  # learned from the events
    capacity: int | None = None  # the engine's KV blocks (vllm:cache_config_info), to end a rebuild
    stored_since_loss: int = 0
    sources: dict[int, _Source] = field(default_factory=dict)
    holders: dict[int, int] = field(default_factory=dict)  # key -> sources holding it (usually one)
    skipped: int = 0  # blocks not indexed: other block sizes, multimodal or salted blocks, unknown parents
    routed: dict[int, int] = field(default_factory=dict)  # key -> requests routed here, their prefill not over
    settling: dict[int, float] = field(default_factory=dict)  # key -> until when it counts held with no event

    @property
    def blocks(self) -> int:
        return len(self.holders)


class KvIndex:
    """The sink of every backend's KV events, and the lookup the policies use."""

    def __init__(self, max_blocks_per_backend: int) -> None:
        self._holders = BlockHolders()
        self._backends: dict[str, BackendBlocks] = {}
        self._max_blocks = max_blocks_per_backend
        self._on_the_way: dict[int, int] = {}  # key -> mask of the backends it is routed or settling on
        self._deadlines: deque[tuple[float, str, int]] = deque()  # settling entries, earliest first

    # -- what the event subscribers call ------------------------------------------------------------------

    def backend(self, url: str) -> BackendBlocks:
        entry = self._backends.get(url)
        if entry is None:
            entry = self._backends[url] = BackendBlocks(url)
        return entry

    def apply(self, url: str, rank: int, events: Iterable[KvEvent]) -> int:
        """Apply one batch of one engine's events in order; returns how many were applied."""
        entry = self.backend(url)
        source = entry.sources.get(rank)
        if source is None:
            source = entry.sources[rank] = _Source()
        count = 0
        for event in events:
            count += 1
            if isinstance(event, BlockStored):
                self._stored(entry, source, event)
            elif isinstance(event, BlockRemoved):
                self._removed(entry, source, event)
            elif isinstance(event, AllBlocksCleared):
                self._drop_source(entry, source)
                self._known_again(entry)
        if entry.blocks > self._max_blocks:
            # More blocks than any engine holds: removals were missed. Start over rather than trust it.
            self.lost(url)
        return count

    def expect(self, url: str, ranks: Iterable[int]) -> None:
        """The backend's engines (data-parallel ranks) that publish: its cache is known only once every one of
        them has synced, not when the first to answer has."""
        sources = self.backend(url).sources
        for rank in ranks:
            sources.setdefault(rank, _Source())

    def synced(self, url: str, rank: int) -> None:
        """The engine's whole event history from its start is applied: its cache is known (empty at start)."""
        entry = self.backend(url)
        entry.sources.setdefault(rank, _Source()).synced = True
        if entry.state is not CacheState.LIVE and all(source.synced for source in entry.sources.values()):
            entry.state = CacheState.LIVE  # also after a loss or a restart: the history is whole again

    def restarted(self, url: str, rank: int) -> None:
        """The engine started afresh (a new event sequence): what it held before is gone."""
        entry = self.backend(url)
        source = entry.sources.get(rank)
        if source is not None:
            self._drop_source(entry, source)
            source.synced = False  # until its new history is read from the start

    def lost(self, url: str) -> None:
        """Events were lost beyond recovery: drop what is known and rebuild from the events that follow."""
        entry = self.backend(url)
        for source in entry.sources.values():
            self._drop_source(entry, source)
            source.synced = False
        entry.state = CacheState.REBUILDING
        entry.stored_since_loss = 0

    def unknown(self, url: str) -> None:
        """Not subscribed, or the engine is down: nothing is known of its cache."""
        entry = self._backends.get(url)
        if entry is None:
            return
        for source in entry.sources.values():
            self._drop_source(entry, source)
        entry.sources.clear()
        entry.state = CacheState.UNKNOWN

    def forget(self, url: str) -> None:
        """The backend left the fleet."""
        self.unknown(url)
        entry = self._backends.get(url)
        if entry is not None:
            slot = self._holders.slot(url)
            for key in {*entry.routed, *entry.settling}:
                self._unmark(key, slot)
        self._backends.pop(url, None)
        self._holders.release_slot(url)

    def set_capacity(self, url: str, blocks: int | None) -> None:
        entry = self._backends.get(url)
        if entry is not None and blocks:
            entry.capacity = blocks

    # -- what routing tells ----------------------------------------------------------------------------------

    def routed(self, url: str, keys: Sequence[int]) -> None:
        """A request with these prompt blocks was just routed to the backend: they are on their way there."""
        entry = self.backend(url)
        slot = self._holders.slot(url)
        routed = entry.routed
        for key in keys:
            count = routed.get(key, 0)
            routed[key] = count + 1
            if not count:
                self._on_the_way[key] = self._on_the_way.get(key, 0) | 1 << slot

    def settled(self, url: str, keys: Sequence[int], now: float) -> None:
        """That request's prefill is over (its first token came, or its attempt ended): its blocks still count
        as held for SETTLE_SECONDS unless the events have confirmed them."""
        entry = self._backends.get(url)
        if entry is None:
            return
        slot = self._holders.slot(url)
        routed, settling, holders = entry.routed, entry.settling, entry.holders
        until = now + SETTLE_SECONDS
        for key in keys:
            count = routed.get(key, 0)
            if count > 1:
                routed[key] = count - 1
                continue
            if not count:
                continue  # already let go (the backend left and came back)
            del routed[key]
            if key in holders:  # the engine announced it: the events take over
                self._stop_settling(entry, key, slot)
            else:
                settling[key] = until
                self._deadlines.append((until, url, key))

    # -- what routing reads ---------------------------------------------------------------------------------

    def block_size(self, urls: Sequence[str]) -> int | None:
        """The block size the engines of these backends use (the first one learned)."""
        for url in urls:
            entry = self._backends.get(url)
            if entry is not None and entry.block_size:
                return entry.block_size
        return None

    def state(self, url: str) -> CacheState:
        entry = self._backends.get(url)
        return entry.state if entry is not None else CacheState.UNKNOWN

    def match(self, keys: Sequence[int], urls: Sequence[str]) -> list[int]:
        """Cached leading blocks of `keys` on each backend (a lower bound where the state is not live)."""
        return self._holders.match(keys, urls)

    def match_routed(self, keys: Sequence[int], urls: Sequence[str], now: float) -> list[int]:
        """Like `match`, with the blocks on their way to each backend (routed, not yet announced) counted held."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            until, url, key = deadlines.popleft()
            entry = self._backends.get(url)
            if entry is not None and entry.settling.get(key) == until:
                self._stop_settling(entry, key, self._holders.slot(url))
        return self._holders.match(keys, urls, self._on_the_way)

    def entry(self, url: str) -> BackendBlocks | None:
        return self._backends.get(url)

    def snapshot(self) -> list[BackendBlocks]:
        return list(self._backends.values())

    # -- internals -------------------------------------------------------------------------------------------

    def _stored(self, entry: BackendBlocks, source: _Source, event: BlockStored) -> None:
        size = event.block_size
        if entry.block_size is None and len(event.token_ids) == size * len(event.block_hashes):
            entry.block_size = size
        parent_hash = event.parent_block_hash
        if parent_hash is None:
            parent: int | None = chain_root(event.lora_name)
        else:
            parent = source.keys.get(parent_hash)
        extra = event.extra_keys
        tokens = event.token_ids
        slot = self._holders.slot(entry.url)
        for index, engine_hash in enumerate(event.block_hashes):
            block = tokens[index * size : (index + 1) * size]
            plain = (
                size == entry.block_size
                and len(block) == size
                and event.group_idx in (None, 0)
                and (extra is None or _only_lora(extra[index] if index < len(extra) else None, event.lora_name))
            )
            if parent is None or not plain:
                entry.skipped += 1
                parent = None  # nothing chained below an unindexed block can match a request either
                continue
            if engine_hash in source.keys:  # stored again (a reuse report): already counted
                parent = source.keys[engine_hash]
                continue
            key = next_key(parent, block)
            if key in entry.settling:  # a block on its way, confirmed
                self._stop_settling(entry, key, slot)
            source.keys[engine_hash] = key
            held = entry.holders.get(key, 0)
            entry.holders[key] = held + 1
            if not held:
                self._holders.add(key, slot)
            entry.stored_since_loss += 1
            parent = key
        if (
            entry.state is CacheState.REBUILDING
            and entry.capacity is not None
            and entry.stored_since_loss >= entry.capacity
        ):
            entry.state = CacheState.LIVE

    def _removed(self, entry: BackendBlocks, source: _Source, event: BlockRemoved) -> None:
        for engine_hash in event.block_hashes:
            key = source.keys.pop(engine_hash, None)
            if key is not None:
                self._unhold(entry, key)

    def _unhold(self, entry: BackendBlocks, key: int) -> None:
        held = entry.holders.get(key, 0) - 1
        if held > 0:
            entry.holders[key] = held
            return
        entry.holders.pop(key, None)
        self._holders.remove(key, self._holders.slot(entry.url))

    def _stop_settling(self, entry: BackendBlocks, key: int, slot: int) -> None:
        """The block no longer counts as on its way to this backend once no routed request still holds it."""
        entry.settling.pop(key, None)
        if key not in entry.routed:
            self._unmark(key, slot)

    def _unmark(self, key: int, slot: int) -> None:
        mask = self._on_the_way.get(key, 0) & ~(1 << slot)
        if mask:
            self._on_the_way[key] = mask
        else:
            self._on_the_way.pop(key, None)

    def _drop_source(self, entry: BackendBlocks, source: _Source) -> None:
        for key in source.keys.values():
            self._unhold(entry, key)
        source.keys.clear()

    @staticmethod
    def _known_again(entry: BackendBlocks) -> None:
        if entry.state is CacheState.REBUILDING:
            entry.state = CacheState.LIVE  # a cleared cache is known: empty


def _only_lora(extra: tuple[object, ...] | None, lora: str | None) -> bool:
    """A block's extra hash keys hold nothing but its adapter's name (no images, no cache salt)."""
    return extra is None or (lora is not None and tuple(extra) == (lora,))
