"""Noticing a client that left, so its upstream request is cancelled at once."""

from __future__ import annotations

import asyncio

from starlette.types import Receive


class DisconnectWatch:
    """Waits for the client's http.disconnect and cancels the request task when it comes early.

    The watching task starts only after `delay`: most answers finish sooner and never pay for a task,
    and uvicorn remembers a disconnect, so one that happened meanwhile is seen at once."""

    def __init__(self, receive: Receive, target: asyncio.Task[object], delay: float = 0.05) -> None:
        self.disconnected = False
        self.finishing = False
        self._receive = receive
        self._target = target
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(delay, self._start)

    def _start(self) -> None:
        self._timer = None
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                if not self.finishing:
                    self.disconnected = True
                    self._target.cancel()
                return

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._task is not None:
            self._task.cancel()
