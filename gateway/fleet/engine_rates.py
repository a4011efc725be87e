"""How fast each engine works, learned from its scraped counters: what the cost model needs to predict TTFT.

- prefill: seconds per prompt token the engine computed (not found in its prefix cache), from
  vllm:request_prefill_time_seconds_sum over vllm:prompt_tokens_total minus vllm:prefix_cache_hits_total;
- departures: requests finished per second (vllm:request_success_total), which turns a queue length into a
  wait (Little's law: a request waits about queue / departures).

Counters are compared over windows of at least `WINDOW_S`, so that one scrape's jitter (a request counted in
one counter and not yet in the other) does not become a rate; each window's figure moves an exponential
average. A counter that goes back means the engine restarted: the window starts again. The computed tokens
behind the prefill figure are counted too: the cost model trusts a backend's own figure only as far as
that evidence goes (cost_model.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.fleet.registry import EngineSample

WINDOW_S = 2.0
WEIGHT = 0.3  # of each new window in the average
MIN_TOKENS = 64  # computed prompt tokens a window needs before it says anything of prefill speed


@dataclass(eq=False, slots=True)
class EngineRates:
    prefill: float | None = None  # seconds per computed prompt token
    departures: float | None = None  # requests finished per second
    prefill_tokens: float = 0.0  # computed prompt tokens the prefill figure was learned from
    _start: EngineSample | None = None

    def learn(self, sample: EngineSample) -> None:
        start = self._start
        if start is None or sample.prompt_tokens < start.prompt_tokens or sample.finished < start.finished:
            self._start = sample
            return
        seconds = sample.at - start.at
        if seconds < WINDOW_S:
            return
        computed = (sample.prompt_tokens - start.prompt_tokens) - (sample.prefix_hits - start.prefix_hits)
        prefill = sample.prefill_seconds - start.prefill_seconds
        if computed >= MIN_TOKENS and prefill > 0:
            self.prefill = _average(self.prefill, prefill / computed)
            self.prefill_tokens += computed
        finished = sample.finished - start.finished
        if finished > 0 or sample.waiting > 0:  # an idle engine says nothing about how fast it drains
            self.departures = _average(self.departures, finished / seconds)
        self._start = sample


def _average(old: float | None, new: float) -> float:
    return new if old is None else old + WEIGHT * (new - old)
