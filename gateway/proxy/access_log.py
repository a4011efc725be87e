"""The access log: one JSON line per request, to the `switchyard.access` logger or straight to the gateway's stderr.

A request hands over its fields as one tuple (`Entry`); turning them into a line is the log's business.

Through `logging`, one line costs tens of microseconds: a LogRecord, the caller's frame, a formatter, a lock
and a write syscall per line. `python -m gateway` owns its process's logging (server.py sets it up), so there
the request only appends its entry to a list, and every `FLUSH_S` (or sooner, when many are waiting) the
entries are formatted in one loop, as the root handler would (`%(asctime)s INFO switchyard.access: <json>`, the
same bytes in the same place), and written with one syscall. Formatting a batch in a tight loop costs a third of
formatting each line on the request path, where the code it needs has long left the CPU's caches. An app
created by other code (tests, an embedding program) keeps the logger, so its own logging configuration and
handlers see every line.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Protocol

import orjson

LOGGER = "switchyard.access"
FLUSH_S = 0.05
FLUSH_ENTRIES = 512

# (time.time() at the end, request id, route, model, backend, status, seconds, ttft seconds, prompt tokens,
#  completion tokens, retries, failovers, cached tokens predicted, cached tokens reported)
Entry = tuple[
    float,
    bytes,
    str,
    str,
    str | None,
    int,
    float,
    float | None,
    int | None,
    int | None,
    int,
    int,
    int | None,
    int | None,
]

_LINE = (
    b'{"request_id":%s,"route":%s,"model":%s,"backend":%s,"status":%d,"duration_ms":%.3f,"ttft_ms":%s,'
    b'"prompt_tokens":%s,"completion_tokens":%s,"retries":%d,"failovers":%d,'
    b'"cached_tokens_predicted":%s,"cached_tokens_reported":%s}'
)
_MAX_NAMES = 4096  # JSON strings kept for the route, model and backend names seen (a bounded set in practice)


class AccessLog(Protocol):
    def write(self, entry: Entry) -> None: ...
    def flush(self) -> None: ...


class LineFormatter:
    """An entry as its JSON line: the same keys, order and values as orjson.dumps of the dict would give."""

    def __init__(self) -> None:
        self._names: dict[str | None, bytes] = {}

    def _name(self, value: str | None) -> bytes:
        text = self._names.get(value)
        if text is None:
            if len(self._names) > _MAX_NAMES:
                self._names.clear()
            text = self._names[value] = orjson.dumps(value)
        return text

    def line(self, entry: Entry) -> bytes:
        _, rid, route, model, backend, status, seconds, ttft, prompt, completion, retries, failovers, pred, rep = entry
        name = self._name
        # Request ids are printable ASCII (proxy/headers.py); only a quote or a backslash needs escaping.
        rid_json = orjson.dumps(rid.decode("latin-1")) if b'"' in rid or b"\\" in rid else b'"' + rid + b'"'
        return _LINE % (
            rid_json,
            name(route),
            name(model),
            name(backend),
            status,
            seconds * 1000,
            b"null" if ttft is None else b"%.3f" % (ttft * 1000),
            b"null" if prompt is None else b"%d" % prompt,
            b"null" if completion is None else b"%d" % completion,
            retries,
            failovers,
            b"null" if pred is None else b"%d" % pred,
            b"null" if rep is None else b"%d" % rep,
        )


class LoggerAccessLog:
    """Each line as a record of the `switchyard.access` logger."""

    def __init__(self) -> None:
        self._logger = logging.getLogger(LOGGER)
        self._format = LineFormatter()

    def write(self, entry: Entry) -> None:
        if self._logger.isEnabledFor(logging.INFO):
            self._logger.info(self._format.line(entry).decode())

    def flush(self) -> None:
        pass


class StreamAccessLog:
    """Lines written to a file descriptor in batches, formatted like logging's `basicConfig` line."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._pending: list[Entry] = []
        self._timer: asyncio.TimerHandle | None = None
        self._format = LineFormatter()
        self._second = -1
        self._stamp = b""

    def write(self, entry: Entry) -> None:
        pending = self._pending
        pending.append(entry)
        if len(pending) >= FLUSH_ENTRIES:
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
        entries = self._pending
        self._pending = []
        line = self._format.line
        parts = []
        for entry in entries:
            now = entry[0]
            second = int(now)
            if second != self._second:  # strftime once a second, not once a line
                self._second = second
                self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second)).encode()
            parts.append(
                b"%s,%03d INFO switchyard.access: %s\n" % (self._stamp, int((now - second) * 1000), line(entry))
            )
        data = memoryview(b"".join(parts))
        while data:
            try:
                written = os.write(self._fd, data)
            except InterruptedError:
                continue
            except OSError:
                return  # stderr closed: the access log cannot be written, the gateway goes on
            data = data[written:]
