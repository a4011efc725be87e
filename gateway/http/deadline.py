"""A deadline that moves with every request, kept by one timer that is rarely re-armed.

A keep-alive connection moves its deadline on every request: the head must arrive by then, the idle connection
closes by then, the backend must answer by then. Arming and cancelling a loop timer each time cost more than the
request's own bookkeeping. Here the timer is armed once, for the first deadline; when it fires it compares the
clock with the deadline as it stands now and either calls back or re-arms itself for the later time. A deadline
moved later costs an attribute write; only one moved earlier than the armed timer re-arms it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

NEVER = float("inf")
# uvloop's timers have millisecond resolution and may fire a little before the time asked for: a deadline that
# close counts as reached, or the timer would re-arm itself for nothing.
_SLACK = 0.002


def _nothing() -> None:
    pass


class Deadline:
    __slots__ = ("_callback", "_loop", "_timer", "_timer_at", "when")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], object]) -> None:
        self._loop = loop
        self._callback = callback
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = NEVER
        self.when = NEVER  # loop time at which `callback` runs, NEVER for no deadline

    def at(self, when: float) -> None:
        """Call back at loop time `when` (replacing any earlier or later deadline)."""
        self.when = when
        if self._timer is None or when < self._timer_at - _SLACK:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(when, self._fire)
            self._timer_at = when

    def after(self, seconds: float) -> None:
        """Call back `seconds` from now."""
        when = self.when = self._loop.time() + seconds
        if self._timer is None or when < self._timer_at - _SLACK:  # at(), inlined: this runs twice a request
            self.at(when)

    def clear(self) -> None:
        """No deadline for now (an armed timer that fires finds none and stops)."""
        self.when = NEVER

    def cancel(self) -> None:
        """No deadline, and no timer left behind (the owner is going away)."""
        self.when = NEVER
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = NEVER

    def close(self) -> None:
        """For good: no timer, and no reference to the owner's callback (which would keep it alive)."""
        self.cancel()
        self._callback = _nothing

    def armed(self) -> bool:
        """A loop timer is pending (for tests: a finished owner leaves none)."""
        return self._timer is not None

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = NEVER
        when = self.when
        if when == NEVER:
            return
        if self._loop.time() + _SLACK >= when:
            self.when = NEVER
            self._callback()
        else:
            self._timer = self._loop.call_at(when, self._fire)
            self._timer_at = when
