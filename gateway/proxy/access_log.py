"""Where the access log's lines go: the `switchyard.access` logger, or straight to the gateway's stderr in batches.

Through `logging`, one line costs tens of microseconds: a LogRecord, the caller's frame, a formatter, a lock
and a write syscall per line. `python -m gateway` owns its process's logging (server.py sets it up), so there
the lines skip all of that: each is formatted as the root handler would (`%(asctime)s INFO switchyard.access:
<json>`, the same bytes in the same place) and appended to a buffer that is written out once per `FLUSH_S`,
or sooner when it grows large, off the request path. An app created by other code (tests, an embedding
program) keeps the logger, so its own logging configuration and handlers see every line.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Protocol

LOGGER = "switchyard.access"
FLUSH_S = 0.05
FLUSH_BYTES = 64 * 1024


class AccessLog(Protocol):
    def enabled(self) -> bool: ...
    def write(self, line: bytes) -> None: ...
    def flush(self) -> None: ...


class LoggerAccessLog:
    """Each line as a record of the `switchyard.access` logger."""

    def __init__(self) -> None:
        self._logger = logging.getLogger(LOGGER)

    def enabled(self) -> bool:
        return self._logger.isEnabledFor(logging.INFO)

    def write(self, line: bytes) -> None:
        self._logger.info(line.decode())

    def flush(self) -> None:
        pass


class StreamAccessLog:
    """Lines written to a file descriptor in batches, formatted like logging's `basicConfig` line."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._pending: list[bytes] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        self._second = -1
        self._stamp = b""

    def enabled(self) -> bool:
        return True

    def write(self, line: bytes) -> None:
        now = time.time()
        second = int(now)
        if second != self._second:  # strftime once a second, not once a line
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second)).encode()
        millis = b"%03d" % int((now - second) * 1000)
        self._pending.append(self._stamp + b"," + millis + b" INFO switchyard.access: " + line + b"\n")
        self._size += len(line) + 56
        if self._size >= FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(FLUSH_S, self.flush)
            except RuntimeError:  # no loop (a line written at shutdown): at once
                self.flush()

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        data = memoryview(b"".join(self._pending))
        self._pending.clear()
        self._size = 0
        while data:
            try:
                written = os.write(self._fd, data)
            except InterruptedError:
                continue
            except OSError:
                return  # stderr closed: the access log cannot be written, the gateway goes on
            data = data[written:]
