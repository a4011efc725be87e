"""`switchyard batch INPUT.jsonl --output OUT.jsonl`: an OpenAI Batch-format file sent through the gateway.

Each input line is `{"custom_id", "method", "url", "body"}`; each output line is
`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}` as in OpenAI's batch output.
Lines go out concurrently; 429/503 answers and connection errors are retried with exponential backoff (honouring
Retry-After). Every finished line is appended, flushed and fsynced on its own, so a crash or Ctrl-C loses nothing
finished, and a rerun skips the custom_ids already in the output (a torn last line is cut off first), so nothing
is duplicated. Malformed input lines are reported by line number and written as error lines. Progress goes to
stderr: a live bar on a terminal, otherwise a plain line every --progress-every seconds and a last one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichBar

RETRY_STATUSES = frozenset({429, 503})
DEFAULT_GATEWAY = "http://127.0.0.1:8000"


@dataclass(frozen=True)
class BatchRequest:
    line: int
    custom_id: str
    method: str
    url: str
    body: dict[str, Any]


@dataclass(frozen=True)
class BadLine:
    line: int
    custom_id: str
    message: str


@dataclass
class Counts:
    total: int
    done: int = 0
    failed: int = 0
    started: float = field(default_factory=time.monotonic)

    def summary(self) -> str:
        elapsed = time.monotonic() - self.started
        rate = self.done / max(elapsed, 1e-9)
        return f"{self.done}/{self.total} done ({self.failed} failed), {rate:.1f} req/s, {elapsed:.0f} s elapsed"


class PlainProgress:
    """Where stderr is not a terminal (CI, a pipe, a file): one line every `interval` seconds, and a last one."""

    def __init__(self, total: int, stream: IO[str], interval: float = 5.0) -> None:
        self.counts = Counts(total)
        self._stream = stream
        self._interval = interval
        self._last = time.monotonic()

    def add(self, ok: bool) -> None:
        self.counts.done += 1
        self.counts.failed += 0 if ok else 1
        if time.monotonic() - self._last >= self._interval:
            self._print()

    def close(self) -> None:
        self._print()

    def _print(self) -> None:
        self._last = time.monotonic()
        self._stream.write(f"switchyard batch: {self.counts.summary()}\n")
        self._stream.flush()


class RichProgress:
    """On a terminal: a live bar with counts, failures, rate, elapsed and remaining time."""

    def __init__(self, total: int, console: Console) -> None:
        self.counts = Counts(total)
        self._bar = RichBar(
            TextColumn("batch"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("[red]{task.fields[failed]} failed"),
            TextColumn("{task.fields[rate]} req/s"),
            TimeElapsedColumn(),
            TextColumn("left"),
            TimeRemainingColumn(),
            console=console,
            refresh_per_second=8,
        )
        self._task = self._bar.add_task("batch", total=total, failed=0, rate="0.0")
        self._bar.start()

    def add(self, ok: bool) -> None:
        self.counts.done += 1
        self.counts.failed += 0 if ok else 1
        rate = self.counts.done / max(time.monotonic() - self.counts.started, 1e-9)
        self._bar.update(self._task, advance=1, failed=self.counts.failed, rate=f"{rate:.1f}")

    def close(self) -> None:
        self._bar.stop()


BatchProgress = PlainProgress | RichProgress


def progress_for(total: int, stream: IO[str], interval: float = 5.0) -> BatchProgress:
    """A rich bar when stream is a terminal, periodic plain lines otherwise."""
    if stream.isatty():
        return RichProgress(total, Console(file=stream))
    return PlainProgress(total, stream, interval)


def parse_input(lines: Iterable[str]) -> tuple[list[BatchRequest], list[BadLine]]:
    """Validate every input line; bad ones (and repeated custom_ids) become BadLine with their line number."""
    good: list[BatchRequest] = []
    bad: list[BadLine] = []
    seen: set[str] = set()
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        fallback = f"line-{number}"
        try:
            item = json.loads(raw)
        except json.JSONDecodeError as exc:
            bad.append(BadLine(number, fallback, f"line {number}: not valid JSON ({exc.msg})"))
            continue
        if not isinstance(item, dict):
            bad.append(BadLine(number, fallback, f"line {number}: expected a JSON object"))
            continue
        custom_id = item.get("custom_id")
        problem = None
        if not isinstance(custom_id, str) or not custom_id:
            problem, custom_id = "custom_id must be a non-empty string", fallback
        elif custom_id in seen:
            problem, custom_id = f"custom_id {item['custom_id']!r} repeats an earlier line", fallback
        elif item.get("method", "POST") != "POST":
            problem = f"method must be POST, got {item.get('method')!r}"
        elif not isinstance(item.get("url"), str) or not item["url"].startswith("/v1/"):
            problem = f"url must be a path starting with /v1/, got {item.get('url')!r}"
        elif not isinstance(item.get("body"), dict):
            problem = "body must be a JSON object"
        elif item["body"].get("stream"):
            problem = "streaming requests cannot be batched (body.stream must be false)"
        if problem:
            bad.append(BadLine(number, custom_id, f"line {number}: {problem}"))
            continue
        seen.add(custom_id)
        good.append(BatchRequest(number, custom_id, "POST", item["url"], item["body"]))
    return good, bad


def finished_ids(output: Path) -> set[str]:
    """custom_ids already written to output; a torn final line (crash mid-write) is truncated away."""
    if not output.exists():
        return set()
    data = output.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep != len(data):
        with output.open("r+b") as f:
            f.truncate(keep)
    ids: set[str] = set()
    for raw in data[:keep].splitlines():
        with contextlib.suppress(json.JSONDecodeError, AttributeError):
            custom_id = json.loads(raw).get("custom_id")
            if isinstance(custom_id, str):
                ids.add(custom_id)
    return ids


def result_line(
    custom_id: str, status: int | None, body: Any, request_id: str | None, error: dict[str, str] | None
) -> dict[str, Any]:
    response = None
    if status is not None:
        response = {"status_code": status, "request_id": request_id or uuid.uuid4().hex, "body": body}
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": response, "error": error}


class Writer:
    """Appends one JSON line at a time, durable before the next (append + flush + fsync)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")

    def write(self, item: dict[str, Any]) -> None:
        self._file.write(json.dumps(item, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    base: float = 0.5
    cap: float = 20.0

    def delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            with contextlib.suppress(ValueError):
                return min(max(float(retry_after), 0.0), self.cap)
        return random.uniform(0, min(self.cap, self.base * 2**attempt))  # full jitter


def _join(gateway: str, path: str) -> str:
    base = gateway.rstrip("/")
    if base.endswith("/v1"):
        base = base[: -len("/v1")]
    return base + path


async def send(session: aiohttp.ClientSession, gateway: str, req: BatchRequest, retry: RetryPolicy) -> dict[str, Any]:
    """One request with retries; always returns an output line (never raises for HTTP/network trouble)."""
    url = _join(gateway, req.url)
    last_error = "no attempt made"
    for attempt in range(retry.attempts):
        try:
            async with session.post(url, json=req.body) as resp:
                raw = await resp.read()
                if resp.status in RETRY_STATUSES and attempt + 1 < retry.attempts:
                    await asyncio.sleep(retry.delay(attempt, resp.headers.get("Retry-After")))
                    continue
                try:
                    body: Any = json.loads(raw) if raw else None
                except json.JSONDecodeError:
                    body = raw.decode("utf-8", "replace")
                request_id = resp.headers.get("x-request-id")
                return result_line(req.custom_id, resp.status, body, request_id, None)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if attempt + 1 < retry.attempts:
                await asyncio.sleep(retry.delay(attempt, None))
    error = {"code": "connection_error", "message": f"{url}: {last_error} (after {retry.attempts} attempts)"}
    return result_line(req.custom_id, None, None, None, error)


async def run_batch(
    requests: list[BatchRequest],
    writer: Writer,
    gateway: str,
    concurrency: int,
    progress: BatchProgress,
    retry: RetryPolicy,
    api_key: str | None = None,
    request_timeout: float = 600.0,
) -> None:
    queue: asyncio.Queue[BatchRequest] = asyncio.Queue()
    for req in requests:
        queue.put_nowait(req)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    client_timeout = aiohttp.ClientTimeout(total=request_timeout, sock_connect=10)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(headers=headers, timeout=client_timeout, connector=connector) as session:

        async def worker() -> None:
            while True:
                try:
                    req = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                line = await send(session, gateway, req, retry)
                writer.write(line)  # synchronous: a cancellation cannot tear a line
                response = line["response"]
                progress.add(response is not None and 200 <= response["status_code"] < 300)

        await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="switchyard batch",
        description="Send an OpenAI Batch-format JSONL file through the gateway; rerun to resume.",
    )
    p.add_argument("input", type=Path, help="input JSONL (custom_id, method, url, body per line)")
    p.add_argument("--output", "-o", type=Path, required=True, help="output JSONL (appended to; resumable)")
    p.add_argument(
        "--gateway", default=os.environ.get("SWITCHYARD_GATEWAY_URL", DEFAULT_GATEWAY), help="gateway base URL"
    )
    p.add_argument("--concurrency", "-c", type=int, default=8, help="requests in flight (default 8)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer key (default $OPENAI_API_KEY)")
    p.add_argument("--max-attempts", type=int, default=6, help="attempts per line on 429/503/connection errors")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request attempt")
    p.add_argument(
        "--progress-every", type=float, default=5.0, help="seconds between progress lines when not on a terminal"
    )
    args = p.parse_args(argv)
    if args.concurrency < 1 or args.max_attempts < 1:
        print("switchyard batch: --concurrency and --max-attempts must be >= 1", file=sys.stderr)
        return 2
    try:
        with args.input.open(encoding="utf-8") as f:
            requests, bad = parse_input(f)
    except (OSError, UnicodeDecodeError) as exc:
        print(f"switchyard batch: cannot read {args.input}: {exc}", file=sys.stderr)
        return 2
    done = finished_ids(args.output)
    todo = [r for r in requests if r.custom_id not in done]
    bad_todo = [b for b in bad if b.custom_id not in done]
    skipped = len(requests) + len(bad) - len(todo) - len(bad_todo)
    if skipped:
        print(f"switchyard batch: resuming, {skipped} line(s) already in {args.output}", file=sys.stderr)
    writer = Writer(args.output)
    for b in bad_todo:  # reported before the progress display starts, so the lines stay readable
        print(f"switchyard batch: {b.message}", file=sys.stderr)
    progress = progress_for(len(todo) + len(bad_todo), sys.stderr, args.progress_every)
    # Started from a background job, SIGINT arrives here ignored; restore it so asyncio turns it into a clean
    # stop (as switchyard up does), rather than the batch running on after an interrupt.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    counts = progress.counts
    try:
        for b in bad_todo:
            writer.write(result_line(b.custom_id, None, None, None, {"code": "invalid_request", "message": b.message}))
            progress.add(False)
        retry = RetryPolicy(attempts=args.max_attempts)
        asyncio.run(
            run_batch(todo, writer, args.gateway, args.concurrency, progress, retry, args.api_key, args.timeout)
        )
    except KeyboardInterrupt:
        interrupted = True
    else:
        interrupted = False
    finally:
        progress.close()  # the last progress line, or the bar left at its final state
        writer.close()
    if interrupted:
        print(f"switchyard batch: interrupted; rerun the same command to resume ({counts.done} written)")
        return 130
    print(f"switchyard batch: {counts.done - counts.failed} succeeded, {counts.failed} failed -> {args.output}")
    return 0 if counts.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
