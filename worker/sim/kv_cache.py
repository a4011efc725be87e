"""The simulated paged KV cache: a pool of fixed-size blocks with vLLM-style prefix caching.

A prompt is cut into full blocks of `block_size` tokens; block i's hash chains the hash of block
i-1, the LoRA adapter (different adapters never share KV) and the block's token ids, so two prompts
share cached blocks exactly as long as their token prefixes (and adapters) agree.

Blocks have a reference count. A block whose count drops to zero keeps its hash and stays
findable ("cached, evictable") until the pool needs room: then the least recently released one is
evicted (its hash forgotten). Blocks without a hash (partial or decode blocks) go straight back to
the free list.
"""

from __future__ import annotations

from collections import OrderedDict


def block_hashes(token_ids: list[int], block_size: int, lora: str | None) -> list[int]:
    """Hash chain of the prompt's full blocks (a trailing partial block is never cached)."""
    hashes: list[int] = []
    parent = hash(("sim-kv-root", lora))
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash((parent, tuple(token_ids[start : start + block_size])))
        hashes.append(parent)
    return hashes


class BlockPool:
    """Fixed pool of KV blocks: allocation, reference counts, hash lookup and LRU eviction."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, int] = {}
        self._block_of: dict[int, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0 and hashed, oldest first

    @property
    def num_used(self) -> int:
        """Blocks referenced by at least one running request."""
        return self.num_blocks - len(self._free) - len(self._evictable)

    @property
    def num_available(self) -> int:
        """Blocks that an allocation may take (free ones plus evictable cached ones)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        return len(self._block_of)

    def usage(self) -> float:
        return self.num_used / self.num_blocks

    def lookup(self, hashes: list[int]) -> list[int]:
        """Blocks holding the longest cached prefix of `hashes` (not yet referenced)."""
        hits: list[int] = []
        for h in hashes:
            block = self._block_of.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def evictable_among(self, blocks: list[int]) -> int:
        return sum(1 for b in blocks if b in self._evictable)

    def acquire(self, blocks: list[int]) -> None:
        """Take a reference on cached blocks (prefix hits)."""
        for b in blocks:
            if self._refs[b] == 0:
                self._evictable.pop(b, None)
            self._refs[b] += 1

    def allocate(self, n: int) -> list[int]:
        """Hand out `n` fresh blocks, evicting least recently used cached blocks when needed."""
        if n > self.num_available:
            raise RuntimeError(f"KV pool exhausted: want {n} blocks, {self.num_available} available")
        out: list[int] = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:
                b, _ = self._evictable.popitem(last=False)
                del self._block_of[self._hash_of.pop(b)]
            self._refs[b] = 1
            out.append(b)
        return out

    def register(self, block: int, block_hash: int) -> None:
        """Make a computed full block findable by later prompts (first writer wins)."""
        if block_hash in self._block_of or block in self._hash_of:
            return
        self._hash_of[block] = block_hash
        self._block_of[block_hash] = block

    def release(self, blocks: list[int]) -> None:
        """Drop one reference on each block; the tail is released first so it is evicted first."""
        for b in reversed(blocks):
            self._refs[b] -= 1
            if self._refs[b] > 0:
                continue
            if b in self._hash_of:
                self._evictable[b] = None
            else:
                self._free.append(b)
