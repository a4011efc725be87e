"""The keys of prompt blocks: chained hashes that the gateway computes itself, the same way on every replica.

Token blocks (the precise mode): key_i = hash((key_{i-1}, tokens of block i)), rooted in the LoRA adapter's
name, because adapters never share KV. The engine's own block hashes are never used as keys: they depend on
its hash function and seed, so the gateway maps them to these keys as events arrive. Python's hash() of a
tuple of ints is not salted (only str and bytes are), so it is the same in every process of one Python
version: replicas built from one image agree.

Character blocks (the approximate mode, for backends that publish no events): the rendered prompt's bytes cut
into fixed blocks, each key a pair of running checksums (crc32 and adler32 of everything up to the block's
end): 64 bits, deterministic, and a few hundred nanoseconds per block.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Sequence
from hashlib import blake2b


@functools.lru_cache(maxsize=1024)
def chain_root(lora: str | None) -> int:
    """The chain's root: one per LoRA adapter (None: the base model)."""
    digest = blake2b(b"switchyard-kv\0" + (lora or "").encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def next_key(parent: int, block: Sequence[int]) -> int:
    return hash((parent, tuple(block)))


def token_block_keys(tokens: Sequence[int], block_size: int, lora: str | None, limit: int | None = None) -> list[int]:
    """Keys of the prompt's full blocks (a trailing partial block is never cached), at most `limit` of them."""
    keys: list[int] = []
    parent = chain_root(lora)
    count = len(tokens) // block_size
    if limit is not None:
        count = min(count, limit)
    for index in range(count):
        start = index * block_size
        parent = hash((parent, tuple(tokens[start : start + block_size])))
        keys.append(parent)
    return keys


def char_block_keys(text: bytes, block_chars: int, salt: int) -> list[int]:
    """Keys of the text's full blocks of `block_chars` bytes; `salt` separates models and adapters."""
    keys: list[int] = []
    crc = zlib.crc32(salt.to_bytes(8, "little", signed=True))
    adler = 1
    for start in range(0, len(text) - block_chars + 1, block_chars):
        block = text[start : start + block_chars]
        crc = zlib.crc32(block, crc)
        adler = zlib.adler32(block, adler)
        keys.append(crc << 32 | adler)
    return keys
