"""The one-timer deadline on a real event loop: it calls back when the current deadline passes, however often the
deadline moved, and leaves no timer behind when cancelled."""

from __future__ import annotations

import asyncio

import uvloop

from gateway.http.deadline import Deadline


def run(coro: object) -> None:
    uvloop.run(coro)  # type: ignore[arg-type]


def test_calls_back_when_the_deadline_passes() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        fired: list[float] = []
        deadline = Deadline(loop, lambda: fired.append(loop.time()))
        start = loop.time()
        deadline.after(0.05)
        await asyncio.sleep(0.15)
        assert len(fired) == 1
        assert fired[0] - start >= 0.045
        assert not deadline.armed()

    run(main())


def test_a_deadline_moved_later_fires_at_the_later_time_only() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        fired: list[float] = []
        deadline = Deadline(loop, lambda: fired.append(loop.time()))
        start = loop.time()
        for _ in range(20):  # a keep-alive connection moving its deadline on every request
            deadline.after(0.05)
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.02)
        assert fired == []  # the first deadline passed long ago, but it moved
        await asyncio.sleep(0.1)
        assert len(fired) == 1
        assert fired[0] - start >= 0.2 + 0.05 - 0.01

    run(main())


def test_a_deadline_moved_earlier_fires_early() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        fired: list[float] = []
        deadline = Deadline(loop, lambda: fired.append(loop.time()))
        start = loop.time()
        deadline.after(10)
        deadline.after(0.05)
        await asyncio.sleep(0.2)
        assert len(fired) == 1
        assert fired[0] - start < 1

    run(main())


def test_cleared_it_does_not_fire_and_set_again_it_does() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        fired: list[float] = []
        deadline = Deadline(loop, lambda: fired.append(loop.time()))
        deadline.after(0.03)
        deadline.clear()
        await asyncio.sleep(0.1)
        assert fired == []
        assert not deadline.armed()  # the timer fired, found no deadline and stopped
        deadline.after(0.03)
        await asyncio.sleep(0.1)
        assert len(fired) == 1

    run(main())


def test_cancelled_it_leaves_no_timer() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        deadline = Deadline(loop, lambda: None)
        deadline.after(60)
        assert deadline.armed()
        deadline.cancel()
        assert not deadline.armed()
        assert deadline.when == float("inf")

    run(main())
