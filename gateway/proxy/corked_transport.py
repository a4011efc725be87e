"""A transport that sends a response's head together with what follows it in the same loop iteration.

uvicorn writes a response's head and each body message with a write of its own: for a small JSON answer,
two syscalls and two TCP segments where one would do. Here the writes of a response's first loop iteration
wait in a list until that iteration's callbacks have run (`call_soon`), then go out in one write: the head and
a body that follows it at once travel together. After that first write the transport is uncorked: a stream's
later chunks go straight through, each with no more than the one write it had. The protocol corks it again
when the next request's head arrives.
"""

from __future__ import annotations

import asyncio
from typing import Any


class CorkedTransport:
    __slots__ = ("_corked", "_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] | None = None
        self._corked = True

    def cork(self) -> None:
        """A new response begins: hold its first writes until the end of the iteration."""
        self._corked = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        pending = self._pending
        if pending is not None:
            pending.append(bytes(data))
        elif self._corked:
            self._pending = [bytes(data)]
            self._loop.call_soon(self._flush)
        else:
            self._transport.write(data)

    def writelines(self, data: Any) -> None:
        for item in data:
            self.write(item)

    def _flush(self) -> None:
        pending = self._pending
        self._pending = None
        self._corked = False
        if pending and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self._flush()  # what was written goes out before the connection closes
        self._transport.close()

    def abort(self) -> None:
        self._pending = None
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(len(part) for part in self._pending or ())

    def __getattr__(self, name: str) -> Any:  # pause_reading, get_extra_info, set_protocol, ...
        return getattr(self._transport, name)
