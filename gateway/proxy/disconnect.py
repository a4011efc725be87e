"""Noticing a client that left, so its upstream request is cancelled at once."""

from __future__ import annotations

import asyncio

from starlette.types import Receive, Scope

from gateway.http.cycle import Cycle, server_cycle


class DisconnectWatch:
    """Cancels the request task when the client leaves before its answer is complete.

    Under the gateway's own server (gateway/http/) the connection calls back when it closes: nothing waits.
    Under any other ASGI server a task waits for the client's http.disconnect; it starts only after `delay`:
    most answers finish sooner and never pay for a task, and the server remembers a disconnect, so one that
    happened meanwhile is seen at once."""

    def __init__(self, scope: Scope, receive: Receive, target: asyncio.Task[object], delay: float = 0.05) -> None:
        self.disconnected = False
        self.finishing = False
        self._receive = receive
        self._target = target
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._cycle: Cycle | None = server_cycle(scope)
        if self._cycle is not None:
            self._cycle.on_disconnect(self._left)
        else:
            self._timer = asyncio.get_running_loop().call_later(delay, self._start)

    def _left(self) -> None:
        if not self.finishing:
            self.disconnected = True
            self._target.cancel()

    def _start(self) -> None:
        self._timer = None
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self._left()
                return

    def stop(self) -> None:
        if self._cycle is not None:
            self._cycle.on_disconnect(None)
        if self._timer is not None:
            self._timer.cancel()
        if self._task is not None:
            self._task.cancel()
