"""A retry budget: retries may add at most a fixed fraction to the request load.

Each request deposits `ratio` of a token (up to `cap`); each retry spends a whole one. A failing fleet
therefore sees at most about (1 + ratio) times its normal load, never a retry storm.
"""

from __future__ import annotations


class RetryBudget:
    def __init__(self, ratio: float = 0.2, cap: float = 10.0) -> None:
        self._ratio = ratio
        self._cap = cap
        self._tokens = cap

    def deposit(self) -> None:
        self._tokens = min(self._cap, self._tokens + self._ratio)

    def try_spend(self) -> bool:
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False
