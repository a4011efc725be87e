"""Token buckets for per-key request and token rates (auth.py turns their levels into x-ratelimit-* headers)."""

from __future__ import annotations

import math
import time


class TokenBucket:
    """`per_minute` units refill evenly; the bucket holds at most one minute's worth.

    Token usage is only known after an answer, so `charge` may take the level below zero: the next
    requests then wait until the debt is paid back."""

    def __init__(self, per_minute: int) -> None:
        self.limit = per_minute
        self.rate = per_minute / 60.0  # units per second
        self._level = float(per_minute)
        self._at = time.monotonic()

    def _refill(self) -> float:
        now = time.monotonic()
        self._level = min(float(self.limit), self._level + (now - self._at) * self.rate)
        self._at = now
        return self._level

    def try_take(self, amount: float = 1.0) -> bool:
        if self._refill() >= amount:
            self._level -= amount
            return True
        return False

    def has_room(self) -> bool:
        return self._refill() > 0

    def charge(self, amount: float) -> None:
        self._refill()
        self._level -= amount

    def level(self) -> float:
        """The units available now (below zero while a token charge is being paid back)."""
        return self._refill()

    def remaining(self) -> int:
        return max(0, math.floor(self._refill()))

    def seconds_until(self, amount: float = 1.0) -> float:
        """Time until `amount` units are available (0 if they are)."""
        missing = amount - self._refill()
        return 0.0 if missing <= 0 else missing / self.rate

    def reset_seconds(self) -> float:
        """Time until the bucket is full again."""
        return (self.limit - self._refill()) / self.rate
