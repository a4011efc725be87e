"""The approximate prefix index: the prompt blocks this gateway sent to each backend, for backends that publish
no KV events (older vLLM, other OpenAI-compatible servers, events turned off) and as the fallback of the
precise index.

Keys are chained character blocks of the whole rendered prompt (block_keys.char_block_keys), so a
conversation's next turn matches the backend that served its previous one, not merely the backend of its
first few hundred characters. Each backend forgets in LRU order what its engine must have evicted: it keeps
at most as many blocks as its KV cache holds (from vllm:cache_config_info, in characters at the prompt's
characters per token), or `default_capacity` blocks when the engine does not say.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from gateway.routing.block_holders import BlockHolders


class ApproximateIndex:
    def __init__(self, default_capacity: int) -> None:
        self._holders = BlockHolders()
        self._recent: dict[str, OrderedDict[int, None]] = {}  # url -> its keys, least recently sent first
        self._capacity: dict[str, int] = {}
        self._default_capacity = default_capacity

    def record(self, url: str, keys: Sequence[int]) -> None:
        """The backend is about to compute (or reuse) these blocks."""
        if not keys:
            return
        recent = self._recent.get(url)
        if recent is None:
            recent = self._recent[url] = OrderedDict()
        slot = self._holders.slot(url)
        for key in keys:
            if key in recent:
                recent.move_to_end(key)
            else:
                recent[key] = None
                self._holders.add(key, slot)
        capacity = self._capacity.get(url, self._default_capacity)
        while len(recent) > capacity:
            key, _ = recent.popitem(last=False)
            self._holders.remove(key, slot)

    def set_capacity(self, url: str, blocks: int) -> None:
        self._capacity[url] = max(1, blocks)

    def match(self, keys: Sequence[int], urls: Sequence[str]) -> list[int]:
        return self._holders.match(keys, urls)

    def urls(self) -> list[str]:
        return list(self._recent)

    def blocks(self, url: str) -> int:
        recent = self._recent.get(url)
        return len(recent) if recent is not None else 0

    def forget(self, url: str) -> None:
        recent = self._recent.pop(url, None)
        self._capacity.pop(url, None)
        if recent is not None:
            slot = self._holders.slot(url)
            for key in recent:
                self._holders.remove(key, slot)
        self._holders.release_slot(url)
