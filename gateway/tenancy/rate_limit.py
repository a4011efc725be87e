"""Token buckets for per-key request and token rates (auth.py turns their levels into x-ratelimit-* headers).

Every method takes the time (time.monotonic) from its caller, so that a request reads the clock once for all
its buckets and headers."""

from __future__ import annotations


class TokenBucket:
    """`per_minute` units refill evenly; the bucket holds at most one minute's worth.

    Token usage is only known after an answer, so `charge` may take the level below zero: the next
    requests then wait until the debt is paid back."""

    __slots__ = ("_at", "_level", "limit", "limit_text", "rate")

    def __init__(self, per_minute: int, now: float) -> None:
        self.limit = per_minute
        self.limit_text = b"%d" % per_minute  # the x-ratelimit-limit-* value
        self.rate = per_minute / 60.0  # units per second
        self._level = float(per_minute)
        self._at = now

    def level(self, now: float) -> float:
        """The units available at `now` (below zero while a token charge is being paid back)."""
        level = self._level + (now - self._at) * self.rate
        if level > self.limit:
            level = float(self.limit)
        self._level = level
        self._at = now
        return level

    def try_take(self, now: float, amount: float = 1.0) -> bool:
        if self.level(now) >= amount:
            self._level -= amount
            return True
        return False

    def charge(self, now: float, amount: float) -> None:
        self._level = self.level(now) - amount

    def seconds_until(self, now: float, amount: float = 1.0) -> float:
        """Time until `amount` units are available (0 if they are)."""
        missing = amount - self.level(now)
        return 0.0 if missing <= 0 else missing / self.rate
