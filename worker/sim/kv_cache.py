"""The simulated paged KV cache: a pool of fixed-size blocks with vLLM-style prefix caching and KV events.

Block hashes: a request's tokens (prompt, then output) are cut into full blocks of `block_size`; block i's hash
chains the hash of block i-1 and the block's token ids, starting from a root hash of (the hash seed, the LoRA
adapter), so two requests share cached blocks exactly as long as their token prefixes (and adapters) agree.
Hashes are unsigned 64-bit ints, as vLLM publishes them by default; the seed (`--kv-hash-seed`) changes every
hash, so two simulators can hold the same tokens under different hashes (a consumer of KV events must key
blocks on token ids, not on one engine's hash function).

The pool behaves as vLLM's `BlockPool`: blocks nobody references wait in one LRU queue (fresh, released and
cached alike, least recently released first; a request releases its last block first). Allocation takes the
queue's head and, when that block still holds a cached hash, evicts it. A hash may be held by several blocks
(two requests computed the same block at once): lookup finds the first, an eviction drops that one copy.
With events on, every eviction appends a `BlockRemoved` to `events`, as vLLM's pool does.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict

from worker.sim.kv_events import MEDIUM_GPU, BlockRemoved, KVEvent

_M64 = (1 << 64) - 1


def root_hash(seed: int, lora: str | None) -> int:
    """Parent of a chain's first block; different adapters never share KV."""
    # ints and tuples of ints hash the same in every process (str hashes do not: the adapter goes in as a crc)
    return hash((seed, -1 if lora is None else zlib.crc32(lora.encode()))) & _M64


def extend_hashes(hashes: list[int], token_ids: list[int], block_size: int, root: int, upto: int) -> None:
    """Append the hashes of blocks len(hashes)..upto-1 of `token_ids` (each must be full)."""
    parent = hashes[-1] if hashes else root
    for b in range(len(hashes), upto):
        parent = hash((parent, tuple(token_ids[b * block_size : (b + 1) * block_size]))) & _M64
        hashes.append(parent)


def block_hashes(token_ids: list[int], block_size: int, root: int) -> list[int]:
    """Hash chain of all full blocks of `token_ids` (a trailing partial block is never cached)."""
    hashes: list[int] = []
    extend_hashes(hashes, token_ids, block_size, root, len(token_ids) // block_size)
    return hashes


class BlockPool:
    """Fixed pool of KV blocks: allocation, reference counts, hash lookup, LRU eviction and its events."""

    def __init__(self, num_blocks: int, events: list[KVEvent] | None = None) -> None:
        self.num_blocks = num_blocks
        self.events = events  # BlockRemoved go here when KV events are on
        self._queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # unreferenced, LRU first
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, int] = {}  # block -> its hash
        self._block_of: dict[int, int] = {}  # hash -> the first block holding it
        self._more: dict[int, list[int]] = {}  # hash -> further blocks holding it (rare)

    @property
    def num_used(self) -> int:
        """Blocks referenced by at least one running request."""
        return self.num_blocks - len(self._queue)

    @property
    def num_available(self) -> int:
        """Blocks that an allocation may take (free ones plus evictable cached ones)."""
        return len(self._queue)

    @property
    def num_cached(self) -> int:
        """Blocks holding a hash (findable, whether referenced or not)."""
        return len(self._hash_of)

    def cached_hashes(self) -> set[int]:
        """Every hash a lookup can find now (what a KV event consumer should hold)."""
        return set(self._block_of)

    def usage(self) -> float:
        return self.num_used / self.num_blocks

    def lookup(self, hashes: list[int]) -> list[int]:
        """Blocks holding the longest cached prefix of `hashes`."""
        hits: list[int] = []
        get = self._block_of.get
        for h in hashes:
            block = get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def evictable_among(self, blocks: list[int]) -> int:
        return sum(1 for b in blocks if b in self._queue)

    def acquire(self, blocks: list[int]) -> None:
        """Take a reference on cached blocks (prefix hits)."""
        for b in blocks:
            if self._refs[b] == 0:
                del self._queue[b]
            self._refs[b] += 1

    def allocate(self, n: int) -> list[int]:
        """Hand out `n` blocks from the LRU queue's head, evicting the cached ones among them."""
        if n > len(self._queue):
            raise RuntimeError(f"KV pool exhausted: want {n} blocks, {len(self._queue)} available")
        out: list[int] = []
        for _ in range(n):
            b, _ = self._queue.popitem(last=False)
            if b in self._hash_of:
                self._evict(b)
            self._refs[b] = 1
            out.append(b)
        return out

    def register(self, block: int, block_hash: int) -> None:
        """Make a computed full block findable (a second block with the same hash is kept too, as in vLLM)."""
        if block in self._hash_of:
            return
        self._hash_of[block] = block_hash
        first = self._block_of.setdefault(block_hash, block)
        if first != block:
            self._more.setdefault(block_hash, []).append(block)

    def release(self, blocks: list[int]) -> None:
        """Drop one reference on each block; the tail is released first so it is evicted first."""
        for b in reversed(blocks):
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._queue[b] = None

    def reset(self, force: bool) -> bool:
        """Forget every hash (vLLM's reset_prefix_cache); refused while blocks are in use, unless `force`."""
        if not force and len(self._queue) < self.num_blocks:
            return False
        self._hash_of.clear()
        self._block_of.clear()
        self._more.clear()
        return True

    def _evict(self, block: int) -> None:
        h = self._hash_of.pop(block)
        more = self._more.get(h)
        if self._block_of[h] == block:
            if more:
                self._block_of[h] = more.pop(0)
            else:
                del self._block_of[h]
        elif more is not None:
            more.remove(block)
        if more is not None and not more:
            del self._more[h]
        if self.events is not None:
            self.events.append(BlockRemoved(block_hashes=[h], medium=MEDIUM_GPU, group_idx=0))
