"""The access log: one JSON line per request, to the `switchyard.access` logger or straight to the gateway's stderr.

A request hands over its fields as one tuple (`Entry`); turning them into a line is the log's business.

Through `logging`, one line costs tens of microseconds: a LogRecord, the caller's frame, a formatter, a lock
and a write syscall per line. `python -m gateway` owns its process's logging (server.py sets it up), so there
the request only appends its entry to a list, and every `FLUSH_S` (or sooner, when many are waiting) the
entries are formatted together, as the root handler would (`%(asctime)s INFO switchyard.access: <json>`, the
same bytes in the same place), and written with one syscall: one orjson call serialises the batch, and a tight
loop adds each line's time stamp. That costs a quarter of formatting each line on the request path, where the
code it needs has long left the CPU's caches. An app
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

_SEPARATOR = b'},{"request_id":'  # between two records of a batch (a quote inside a string is escaped)
_FIRST = b'[{"request_id":'
_LINE = b'%s,%03d INFO switchyard.access: {"request_id":%s}\n'  # logging.basicConfig's layout


class AccessLog(Protocol):
    def write(self, entry: Entry) -> None: ...
    def flush(self) -> None: ...


def record(entry: Entry) -> dict[str, object]:
    """An entry as the JSON object of its line, in the log's key order."""
    _, rid, route, model, backend, status, seconds, ttft, prompt, completion, retries, failovers, pred, rep = entry
    return {
        "request_id": rid.decode("latin-1"),
        "route": route,
        "model": model,
        "backend": backend,
        "status": status,
        "duration_ms": round(seconds * 1000, 3),
        "ttft_ms": None if ttft is None else round(ttft * 1000, 3),
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "retries": retries,
        "failovers": failovers,
        "cached_tokens_predicted": pred,
        "cached_tokens_reported": rep,
    }


def record_bodies(entries: list[Entry]) -> list[bytes]:
    """Each entry's JSON object between its `{"request_id":` and its `}`. One orjson call serialises the whole
    batch, as an array, which is then cut between its records: half the cost of a call per line."""
    array = orjson.dumps(list(map(record, entries)))
    bodies = array[len(_FIRST) : -len(b"}]")].split(_SEPARATOR)
    if len(bodies) != len(entries):  # cannot happen (see _SEPARATOR); were it to, one call each
        return [orjson.dumps(record(entry))[len(_FIRST) - 1 : -1] for entry in entries]
    return bodies


class LoggerAccessLog:
    """Each line as a record of the `switchyard.access` logger."""

    def __init__(self) -> None:
        self._logger = logging.getLogger(LOGGER)

    def write(self, entry: Entry) -> None:
        if self._logger.isEnabledFor(logging.INFO):
            self._logger.info(orjson.dumps(record(entry)).decode())

    def flush(self) -> None:
        pass


class StreamAccessLog:
    """Lines written to a file descriptor in batches, formatted like logging's `basicConfig` line."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._pending: list[Entry] = []
        self._timer: asyncio.TimerHandle | None = None
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
        parts = []
        last, stamp = self._second, self._stamp
        for entry, body in zip(entries, record_bodies(entries), strict=True):
            now = entry[0]
            second = int(now)
            if second != last:  # strftime once a second, not once a line
                last = second
                stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second)).encode()
            parts.append(_LINE % (stamp, int((now - second) * 1000), body))
        self._second, self._stamp = last, stamp
        data = memoryview(b"".join(parts))
        while data:
            try:
                written = os.write(self._fd, data)
            except InterruptedError:
                continue
            except OSError:
                return  # stderr closed: the access log cannot be written, the gateway goes on
            data = data[written:]
