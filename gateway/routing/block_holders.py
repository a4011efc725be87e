"""Which backends hold which blocks: one bitmask of backend slots per block key.

Shared by both prefix indexes (the engines' events, the gateway's own guesses). A lookup walks the prompt's
keys once, narrowing the set of candidate backends that still hold every block so far: O(blocks) dict reads,
whatever the number of backends.
"""

from __future__ import annotations

from collections.abc import Sequence


class BlockHolders:
    def __init__(self) -> None:
        self._masks: dict[int, int] = {}
        self._slots: dict[str, int] = {}  # backend url -> its bit
        self._free: list[int] = []

    def __len__(self) -> int:
        return len(self._masks)

    def slot(self, url: str) -> int:
        """The backend's bit number, assigned on first use."""
        slot = self._slots.get(url)
        if slot is None:
            slot = self._free.pop() if self._free else len(self._slots)
            self._slots[url] = slot
        return slot

    def release_slot(self, url: str) -> None:
        """Forget a backend whose blocks have all been removed (its bit may be reused)."""
        slot = self._slots.pop(url, None)
        if slot is not None:
            self._free.append(slot)

    def add(self, key: int, slot: int) -> None:
        self._masks[key] = self._masks.get(key, 0) | 1 << slot

    def remove(self, key: int, slot: int) -> None:
        mask = self._masks.get(key)
        if mask is None:
            return
        mask &= ~(1 << slot)
        if mask:
            self._masks[key] = mask
        else:
            del self._masks[key]

    def held(self, key: int, slot: int) -> bool:
        return bool(self._masks.get(key, 0) >> slot & 1)

    def match(self, keys: Sequence[int], urls: Sequence[str], also: dict[int, int] | None = None) -> list[int]:
        """For each url, how many of `keys` it holds from the first one on (its cached prefix in blocks); with
        `also` (more masks over the same slots), a block held in either counts."""
        slots = [self._slots.get(url) for url in urls]
        remaining = 0
        for slot in slots:
            if slot is not None:
                remaining |= 1 << slot
        ended: dict[int, int] = {}  # slot -> blocks held
        masks = self._masks
        depth = 0
        for depth, key in enumerate(keys):
            if not remaining:
                break
            held = (masks.get(key, 0) | also.get(key, 0) if also else masks.get(key, 0)) & remaining
            lost = remaining & ~held
            while lost:
                low = lost & -lost
                ended[low.bit_length() - 1] = depth
                lost ^= low
            remaining = held
        else:
            depth = len(keys)
        while remaining:
            low = remaining & -remaining
            ended[low.bit_length() - 1] = depth
            remaining ^= low
        return [0 if slot is None else ended.get(slot, 0) for slot in slots]
