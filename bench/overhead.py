"""What the gateway costs: the same load sent straight to a fast upstream and through the gateway.

Run (from the repository root, with the venv's Python; `wrk` on PATH is used when present):

    .venv/bin/python bench/overhead.py                 # about 2 minutes with the default --duration 10
    .venv/bin/python bench/overhead.py --quick         # a ~25 s smoke run
    .venv/bin/python bench/overhead.py --json out.json # also save every figure

It starts two child processes on 127.0.0.1, each on a free port: bench/fast_upstream.py (an asyncio protocol
on uvloop and httptools that answers with canned bytes, as cheap as an upstream gets) and the gateway
(`python -m gateway`, static discovery of that one upstream). Both are stopped when the run ends, fails or is
interrupted (Ctrl-C, SIGTERM; on Linux they also get SIGTERM if this process dies). Every phase measures the
direct path and the gateway path in alternating slices, so noise from other work on the machine lands on both.

The request is a small non-stream chat completion (113 bytes in, 317 bytes of JSON out). What is printed:

- Latency, ms, p50/p90/p99, direct vs gateway and `added` = gateway minus direct:
  * `sequential`: one request at a time on one keep-alive connection, from a minimal asyncio HTTP/1.1
    client (no aiohttp parsing: its cost is tiny and the same on both paths);
  * `sequential wrk -c1`: the same with wrk as the client (how the peers' table in notes/peers.md was measured);
  * `open loop R req/s`: Poisson arrivals at --rate (default 200/s; the same arrival schedule on both paths),
    each request on an idle pooled connection or a new one, so slow answers never delay later sends.
  Latency is from writing the request to reading the last byte of the answer.
- Max throughput: requests/s at --connections (default 64) concurrent keep-alive connections, from wrk
  (`-t1`, a Lua script for the POST body) or, without wrk, from the asyncio client.
- Gateway CPU per request, µs: utime+stime of the gateway process (/proc/PID/stat) over a phase divided by
  the requests it served. The max-throughput figure is the one that travels between machines (latency depends
  on the machine's load, CPU time per request much less); at low rates it is higher, since each request pays
  its own wake-ups and syscalls. The upstream's CPU per request is shown too, for scale. Besides the defaults
  the gateway runs as `round-robin` (the cheapest policy: what the default cache-aware pick adds to a short
  prompt), `no-log` (the access log off), `keys` (an API key with rpm/tpm limits) and, with --tracing,
  `tracing`.
- Streams: SSE chunks/s received with --streams (default 4) concurrent streams of --chunks (default 1000)
  chunks each (211 bytes apiece), repeated for the phase's duration, and the gateway's CPU per chunk. The
  upstream writes each chunk with its own send() as fast as it can, so the kernel coalesces them and the
  gateway relays several per read: this measures relay bandwidth for a token burst, not per-token latency.
- Open streams: --paced-streams (default 2,000) streams open at once, each a chunk every --interval-ms (default
  100), opened one after another; the window opens once every stream flows, so what it measures is the
  relay, not the setting up. Three slices of half --duration each, the paths' order rotating: one hiccup of
  a shared machine lands on whichever path is measured then, so `added p99` is the median over the slices of
  the path's p99 gap minus direct's in the same slice (each slice's is printed too). Also printed: the gaps
  over all slices (p50/p99/p99.9) and the proxy's memory per open stream. A second phase does the same while
  each stream ends after about --stream-life chunks and a new one, on a new connection, takes its place: the
  first streams start part-way through their lives, so streams end at the steady rate from the start (200 a
  second with the defaults) on every path alike, and the proxy starts and ends them while it relays the rest.
  The client's own garbage collector is off in these phases: its pauses would read as the proxy's gaps.

All processes share the machine's cores (2 on the development machines), so max throughput is bounded by
client + gateway + upstream together; compare paths, not absolute numbers between machines. With --pin each
proxy runs on one CPU and the client, wrk and the upstream on the others, as proxies are benchmarked on one
host: the load generator can no longer preempt the proxy, so the open-streams gaps show the proxy's own
backlog. vllm-router's threads then share that one CPU too, as the gateway's one process does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import functools
import gc
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from typing import Any, TextIO, cast

import aiohttp
import uvloop

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODEL = "bench-model"
CHAT = "/v1/chat/completions"
SMALL_BODY = (
    b'{"model":"bench-model","messages":[{"role":"user","content":"Say hello in one short sentence."}],"max_tokens":16}'
)
CLK_TCK = os.sysconf("SC_CLK_TCK")
Runner = Callable[["Target"], Awaitable["Sample"]]  # a path -> one measurement

WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '@BODY@'
wrk.headers["Content-Type"] = "application/json"

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "errors": %d, "non2xx": %d, ' ..
    '"p50_us": %d, "p90_us": %d, "p99_us": %d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
"""


# -- child processes ----------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the benchmark process dies, however it dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def cpu_split() -> tuple[set[int], set[int]]:
    """--pin: the first CPU this process may use for the proxies, the rest for the client and the upstream."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("--pin needs at least 2 CPUs")
    return {cpus[0]}, set(cpus[1:])


class Children:
    """Starts child processes and stops every one of them (SIGTERM, then SIGKILL) when the block exits."""

    def __init__(self, workdir: Path) -> None:
        self._workdir = workdir
        self._procs: list[tuple[str, subprocess.Popen[bytes], TextIO]] = []

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        for _, proc, _log in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
        for _, proc, log in reversed(self._procs):
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()

    def start(
        self, name: str, argv: list[str], env: dict[str, str] | None = None, cpus: set[int] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start a child; `cpus` pins it (and its threads) to those CPUs, else it inherits this process's."""
        log = (self._workdir / f"{name}.log").open("w")

        def before_exec() -> None:
            if sys.platform == "linux":
                _die_with_parent()
            if cpus is not None:
                os.sched_setaffinity(0, cpus)

        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches only the benchmark, which then stops them in order
            preexec_fn=before_exec,
        )
        self._procs.append((name, proc, log))
        return proc

    def alive(self, name: str) -> bool:
        return any(proc.poll() is None for label, proc, _ in self._procs if label == name)

    def log_tail(self, name: str, lines: int = 30) -> str:
        text = (self._workdir / f"{name}.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


def gateway_revision() -> str:
    """The commit the gateway code comes from, marked when gateway/ has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, timeout=10)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "gateway"], cwd=ROOT, capture_output=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    revision = head.stdout.decode().strip() or "unknown"
    return revision + (" + uncommitted changes in gateway/" if dirty.stdout.strip() else "")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_ready(children: Children, name: str, proc: subprocess.Popen[bytes], url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited with {proc.returncode}:\n{children.log_tail(name)}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{name} not ready at {url} after {timeout:g} s:\n{children.log_tail(name)}")
        time.sleep(0.1)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        fields = stat.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# -- results ------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One path's figures in one phase, summed over its slices."""

    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds, client-measured
    chunks: int = 0
    gateway_cpu: float = 0.0  # the path's own process (the proxy); 0 for direct
    upstream_cpu: float = 0.0
    wrk_slices: list[dict[str, float]] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)  # seconds between consecutive chunks of one stream
    rss_per_stream: float = 0.0  # bytes of the proxy's memory per open stream
    slice_gap_p99: list[float] = field(default_factory=list)  # ms, each slice's own p99 gap

    def add(self, other: Sample) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.seconds += other.seconds
        self.latencies += other.latencies
        self.chunks += other.chunks
        self.gateway_cpu += other.gateway_cpu
        self.upstream_cpu += other.upstream_cpu
        self.wrk_slices += other.wrk_slices
        self.gaps += other.gaps
        if other.gaps:
            self.slice_gap_p99.append(other.gap_ms(99))
        self.rss_per_stream = max(self.rss_per_stream, other.rss_per_stream)  # the first slice's: memory grew

    def gap_ms(self, q: float) -> float:
        if not self.gaps:
            return float("nan")
        ordered = sorted(self.gaps)
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] * 1000

    def percentile_ms(self, q: float) -> float:
        if self.wrk_slices:  # wrk reports per run: average the runs' percentiles
            key = f"p{q:g}_us"
            return sum(run[key] for run in self.wrk_slices) / len(self.wrk_slices) / 1000
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] * 1000

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def cpu_us(self, seconds: float, per: int) -> float:
        return seconds / per * 1e6 if per else float("nan")

    def summary(self) -> dict[str, float]:
        out = {
            "requests": float(self.requests),
            "errors": float(self.errors),
            "seconds": round(self.seconds, 3),
            "requests_per_s": round(self.rate, 1),
            "p50_ms": round(self.percentile_ms(50), 4),
            "p90_ms": round(self.percentile_ms(90), 4),
            "p99_ms": round(self.percentile_ms(99), 4),
            "gateway_cpu_us_per_request": round(self.cpu_us(self.gateway_cpu, self.requests), 1),
            "upstream_cpu_us_per_request": round(self.cpu_us(self.upstream_cpu, self.requests), 1),
        }
        if self.chunks:
            out["chunks"] = float(self.chunks)
            out["chunks_per_s"] = round(self.chunks / self.seconds, 1)
            out["gateway_cpu_us_per_chunk"] = round(self.cpu_us(self.gateway_cpu, self.chunks), 2)
        return out


@dataclass
class Phase:
    name: str
    samples: dict[str, Sample] = field(default_factory=dict)  # path -> its figures, in the order measured


# -- a minimal HTTP/1.1 client ------------------------------------------------------------------------


class HttpConnection(asyncio.Protocol):
    """One keep-alive connection, one request at a time; knows Content-Length and chunked answers."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiter: asyncio.Future[int] | None = None
        self._end = -1  # where the current answer ends in the buffer; -1 while its head is incomplete
        self._chunked = False
        self._status = 0
        self.closed = False

    @classmethod
    async def open(cls, port: int) -> HttpConnection:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(lambda: cls(loop), "127.0.0.1", port)
        return protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionError("the server closed the connection"))

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._waiter is not None and not self._waiter.done():
            self._parse()

    def _parse(self) -> None:
        buffer = self._buffer
        assert self._waiter is not None
        if self._end < 0:
            head_end = buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = bytes(buffer[:head_end]).lower()
            self._status = int(head[9:12])
            start = head.find(b"\r\ncontent-length:")
            if start >= 0:
                stop = head.find(b"\r\n", start + 2)
                self._end = head_end + 4 + int(head[start + 17 : stop if stop >= 0 else None])
                self._chunked = False
            elif b"\r\ntransfer-encoding: chunked" in head:
                self._end = head_end + 2  # search for the last chunk from here
                self._chunked = True
            else:
                self._waiter.set_exception(ConnectionError("answer without Content-Length or chunked framing"))
                return
        if self._chunked:
            last = buffer.find(b"\r\n0\r\n\r\n", self._end)
            if last < 0:
                self._end = max(self._end, len(buffer) - 7)
                return
            end = last + 7
        else:
            end = self._end
            if len(buffer) < end:
                return
        del buffer[:end]
        self._end = -1
        self._waiter.set_result(self._status)

    async def request(self, data: bytes) -> int:
        """Send one whole request and wait for the whole answer; returns its status."""
        assert self._transport is not None
        self._waiter = self._loop.create_future()
        self._transport.write(data)
        return await self._waiter

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


def chat_request(port: int, body: bytes = SMALL_BODY, extra: str = "") -> bytes:
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def sequential(port: int, seconds: float, extra: str = "") -> Sample:
    sample = Sample()
    request = chat_request(port, extra=extra)
    conn = await HttpConnection.open(port)
    try:
        started = perf_counter()
        deadline = started + seconds
        now = started
        while now < deadline:
            status = await conn.request(request)
            done = perf_counter()
            sample.latencies.append(done - now)
            sample.requests += 1
            sample.errors += status != 200
            now = done
        sample.seconds = now - started
    finally:
        conn.close()
    return sample


async def open_loop(port: int, rate: float, seconds: float, seed: int, extra: str = "") -> Sample:
    """Poisson arrivals: each request goes out at its scheduled time on an idle or a new connection."""
    sample = Sample()
    request = chat_request(port, extra=extra)
    rng = random.Random(seed)
    idle: list[HttpConnection] = []
    every: list[HttpConnection] = []
    pending: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()

    async def one() -> None:
        if idle:
            conn = idle.pop()
        else:
            conn = await HttpConnection.open(port)
            every.append(conn)
        sent = perf_counter()
        try:
            status = await conn.request(request)
        except ConnectionError:
            sample.errors += 1
            return
        sample.latencies.append(perf_counter() - sent)
        sample.requests += 1
        sample.errors += status != 200
        idle.append(conn)

    idle.append(await HttpConnection.open(port))
    every.extend(idle)
    try:
        started = perf_counter()
        at = started
        while True:
            at += rng.expovariate(rate)
            if at - started >= seconds:
                break
            delay = at - perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = loop.create_task(one())
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*pending)
        sample.seconds = perf_counter() - started
    finally:
        for conn in every:
            conn.close()
    return sample


async def closed_loop(port: int, connections: int, seconds: float, extra: str = "") -> Sample:
    """Max throughput without wrk: `connections` keep-alive connections, each sending back to back."""
    request = chat_request(port, extra=extra)
    conns = [await HttpConnection.open(port) for _ in range(connections)]
    sample = Sample()
    deadline = perf_counter() + seconds

    async def worker(conn: HttpConnection) -> None:
        while perf_counter() < deadline:
            sent = perf_counter()
            status = await conn.request(request)
            sample.latencies.append(perf_counter() - sent)
            sample.requests += 1
            sample.errors += status != 200

    started = perf_counter()
    try:
        await asyncio.gather(*(worker(conn) for conn in conns))
    finally:
        for conn in conns:
            conn.close()
    sample.seconds = perf_counter() - started
    return sample


async def streams(port: int, concurrent: int, chunks: int, seconds: float, headers: dict[str, str]) -> Sample:
    """`concurrent` workers, each opening one stream of `chunks` SSE chunks after another until time is up."""
    body = json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "Count."}], "stream": True, "max_tokens": chunks}
    ).encode()
    url = f"http://127.0.0.1:{port}{CHAT}"
    sample = Sample()
    deadline = perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:

        async def worker() -> None:
            while perf_counter() < deadline:
                events = 0
                last = b""
                async with session.post(
                    url, data=body, headers={"Content-Type": "application/json", **headers}
                ) as response:
                    async for data in response.content.iter_any():
                        events += (last + data).count(b"\n\n")
                        last = data[-1:]
                sample.requests += 1
                sample.chunks += max(0, events - 1)  # not counting `data: [DONE]`
                sample.errors += response.status != 200 or events != chunks + 1

        started = perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrent)))
        sample.seconds = perf_counter() - started
    return sample


async def wrk(port: int, connections: int, seconds: int, script: Path) -> Sample:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", "-s", str(script)]
    proc = await asyncio.create_subprocess_exec(
        *argv, f"http://127.0.0.1:{port}{CHAT}", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=seconds + 30)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    for line in out.decode(errors="replace").splitlines():
        if line.startswith("WRKJSON "):
            run: dict[str, float] = json.loads(line[len("WRKJSON ") :])
            return Sample(
                requests=int(run["requests"]),
                errors=int(run["errors"] + run["non2xx"]),
                seconds=run["duration_us"] / 1e6,
                wrk_slices=[run],
            )
    raise RuntimeError(f"wrk printed no result:\n{out.decode(errors='replace')}")


DONE_EVENT = b"data: [DONE]\n\n"


class StreamConnection(asyncio.Protocol):
    """One paced SSE stream, recording the gap between consecutive events as they arrive."""

    def __init__(self, gaps: list[float], measuring: list[bool]) -> None:
        loop = asyncio.get_running_loop()
        self.flowing: asyncio.Future[None] = loop.create_future()  # its first event came (or it ended)
        self.done: asyncio.Future[bool] = loop.create_future()  # it ended: True with its [DONE]
        self._gaps = gaps
        self._measuring = measuring
        self._last = 0.0
        self._tail = b""
        self._end = b""
        self.events = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        now = perf_counter()
        events = (self._tail + data).count(b"\n\n")
        self._tail = data[-1:]
        if events:
            if self.events and self._measuring[0]:
                self._gaps.append(now - self._last)
                self._gaps.extend([0.0] * (events - 1))  # arrived together: no gap between them
            elif not self.events:
                self.flowing.set_result(None)
            self._last = now
            self.events += events
        seen = self._end + data  # the body is chunked: [DONE] is not its last bytes, and a read may split it
        self._end = seen[-len(DONE_EVENT) :]
        if DONE_EVENT in seen and not self.done.done():
            self.done.set_result(True)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.flowing.done():
            self.flowing.set_result(None)
        if not self.done.done():
            self.done.set_result(False)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status", "rb") as status:
        for line in status:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


async def paced_streams(
    target: Target, count: int, interval_ms: float, seconds: float, life: int = 0, seed: int = 0
) -> Sample:
    """`count` streams open at once, each a chunk every `interval_ms` (a model decoding), for `seconds`; the
    proxy's memory is read with all of them open. With `life`, each stream ends after about that many chunks
    (uniform within +-50%) and a new one takes its place, so the proxy also starts and ends streams while it
    relays the others, as it does in production; without, every stream outlasts the window."""
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    gaps: list[float] = []
    measuring = [False]
    stopping = False
    sample = Sample()
    live: set[StreamConnection] = set()

    def lifetime(first: bool) -> int:
        if not life:
            return int((seconds + 120) * 1000 / interval_ms)
        while True:
            chunks = rng.randint(life // 2, life * 3 // 2)
            if not first:
                return chunks
            # The first streams join a churn already under way: each is seen at a uniform point of a life drawn in
            # proportion to its length (a renewal process's residual life), so streams end at the steady rate from
            # the start, on every path alike, and not in a wave whose timing depends on how fast a path opened them.
            if rng.random() * (life * 3 // 2) <= chunks:
                return rng.randint(1, chunks)

    async def start(first: bool = False) -> StreamConnection:
        chunks = lifetime(first)
        body = json.dumps({"model": MODEL, "messages": [], "stream": True, "max_tokens": chunks,
                           "interval_ms": interval_ms}).encode()  # fmt: skip
        _, conn = await loop.create_connection(
            functools.partial(StreamConnection, gaps, measuring), "127.0.0.1", target.port
        )
        assert conn.transport is not None
        conn.transport.write(chat_request(target.port, body, target.extra))
        live.add(conn)
        return conn

    async def replacing(conn: StreamConnection) -> None:
        while True:
            complete = await conn.done
            live.discard(conn)
            conn.close()
            if stopping:
                return
            sample.requests += measuring[0]  # the streams that ended in the window
            sample.errors += not complete
            conn = await start()
            if stopping:  # the window closed while it was being opened
                conn.close()

    # This client's own collector would pause it, with thousands of connections open, and its pauses would read
    # as the proxy's gaps: it collects before the phase instead.
    gc.collect()
    gc.disable()
    try:
        before = rss_bytes(target.pid) if target.pid else 0
        first: list[StreamConnection] = []
        slots: list[asyncio.Task[None]] = []
        for _ in range(count):  # one after another: a thundering herd is not measured here
            first.append(await start(first=True))
            if life:
                slots.append(asyncio.create_task(replacing(first[-1])))
        # The window opens once every stream flows: the proxy's work of setting them up is not what it measures
        # (with `life`, starting and ending streams goes on all through the window).
        await asyncio.wait_for(asyncio.gather(*(conn.flowing for conn in first)), timeout=60)
        await asyncio.sleep(2 * interval_ms / 1000)
        measuring[0] = True
        started = perf_counter()
        await asyncio.sleep(seconds)
        measuring[0] = False
        sample.seconds = perf_counter() - started
        if target.pid:
            sample.rss_per_stream = max(rss_bytes(target.pid) - before, 0) / count
        sample.gaps = gaps
        sample.chunks = len(gaps)
        if not life:
            sample.requests = count
            sample.errors = sum(conn.done.done() for conn in first)  # none may end before the window does
        stopping = True
        for conn in list(live):
            conn.close()
        await asyncio.gather(*slots, *(conn.done for conn in first))
        return sample
    finally:
        gc.enable()


# -- the run ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One path to the upstream: the upstream itself, or a proxy in front of it."""

    name: str
    port: int
    pid: int  # the proxy's process (0 for direct)
    extra: str = ""  # request header lines it needs (an API key)

    @property
    def headers(self) -> dict[str, str]:
        name, _, value = self.extra.strip().partition(": ")
        return {name: value} if name else {}


OPEN_SLICES = 3
LATENCY_PATHS = ("direct", "gateway", "vllm-router")
# round-robin: the gateway with the cheapest policy, to show what the default (cache-aware) pick adds
CPU_PATHS = ("direct", "gateway", "round-robin", "no-log", "keys", "tracing", "vllm-router")
# no-failover: what watching every stream for a failover (return_token_ids, the id bookkeeping) costs
STREAM_PATHS = ("direct", "gateway", "no-failover", "vllm-router")


@dataclass
class Bench:
    args: argparse.Namespace
    targets: dict[str, Target]
    upstream_pid: int
    wrk_scripts: dict[str, Path] | None
    revision: str
    pinning: str | None = None  # --pin: which CPUs the proxies and the load got
    phases: list[Phase] = field(default_factory=list)

    def paths(self, wanted: tuple[str, ...]) -> list[Target]:
        return [self.targets[name] for name in wanted if name in self.targets]

    async def measure(self, target: Target, run: Runner) -> Sample:
        proxy0 = cpu_seconds(target.pid) if target.pid else 0.0
        upstream0 = cpu_seconds(self.upstream_pid)
        sample = await run(target)
        sample.gateway_cpu = cpu_seconds(target.pid) - proxy0 if target.pid else 0.0
        sample.upstream_cpu = cpu_seconds(self.upstream_pid) - upstream0
        return sample

    async def phase(self, name: str, slices: int, make: Callable[[int], Runner], wanted: tuple[str, ...]) -> Phase:
        """Every path once per slice, the order rotating from slice to slice, summing each path's figures: noise
        from the rest of the machine lands on all of them alike."""
        targets = self.paths(wanted)
        phase = Phase(name, {target.name: Sample() for target in targets})
        print(f"  {name} ({', '.join(phase.samples)}) ...", file=sys.stderr, flush=True)
        for index in range(slices):
            shift = index % len(targets)
            for target in targets[shift:] + targets[:shift]:
                phase.samples[target.name].add(await self.measure(target, make(index)))
        self.phases.append(phase)
        return phase

    async def preflight(self) -> None:
        """One plain and one streamed request on each path must succeed, or there is nothing to measure."""
        stream_body = json.dumps({"model": MODEL, "messages": [], "stream": True, "max_tokens": 3}).encode()
        async with aiohttp.ClientSession() as session:
            for target in self.targets.values():
                for body in (SMALL_BODY, stream_body):
                    url = f"http://127.0.0.1:{target.port}{CHAT}"
                    headers = {"Content-Type": "application/json", **target.headers}
                    async with session.post(url, data=body, headers=headers) as response:
                        text = await response.read()
                    if response.status != 200 or (body is stream_body and not text.endswith(b"data: [DONE]\n\n")):
                        raise SystemExit(f"preflight: {target.name} answered {response.status}: {text[:500]!r}")

    async def run(self) -> None:
        args = self.args
        duration: float = args.duration
        slices = max(2, round(duration))  # about one second per slice for the Python-client phases
        rounds = 2  # wrk runs per path (whole seconds each)
        wrk_seconds = max(1, round(duration / rounds))

        await self.preflight()
        print("warming up ...", file=sys.stderr, flush=True)
        for target in self.targets.values():
            await sequential(target.port, 0.3 if args.quick else 1.0, target.extra)
            await closed_loop(target.port, args.connections, 0.3 if args.quick else 1.0, target.extra)
            await streams(target.port, args.streams, 50, 0.2, target.headers)

        print("measuring:", file=sys.stderr, flush=True)
        each = duration / slices
        phases = set(args.phases.split(","))
        if "latency" in phases:
            await self.latency_phases(slices, rounds, each, wrk_seconds)
        if "throughput" in phases:
            await self.throughput_phases(rounds, wrk_seconds)
        if "open" in phases and args.paced_streams:
            await self.open_stream_phases(duration)

    async def latency_phases(self, slices: int, rounds: int, each: float, wrk_seconds: int) -> None:
        args = self.args
        await self.phase("sequential", slices, lambda i: lambda t: sequential(t.port, each, t.extra), LATENCY_PATHS)
        scripts = self.wrk_scripts
        if scripts is not None:
            await self.phase(
                "sequential wrk -c1", rounds, lambda i: lambda t: wrk(t.port, 1, wrk_seconds, scripts[t.name]),
                LATENCY_PATHS,
            )  # fmt: skip
        await self.phase(
            f"open loop {args.rate:g} req/s",
            slices,
            lambda i: lambda t: open_loop(t.port, args.rate, each, seed=i, extra=t.extra),
            LATENCY_PATHS,
        )

    async def throughput_phases(self, rounds: int, wrk_seconds: int) -> None:
        args = self.args
        scripts = self.wrk_scripts
        if scripts is not None:
            await self.phase(
                f"max wrk -t1 -c{args.connections}",
                rounds * 2,  # the headline figures: twice the rounds
                lambda i: lambda t: wrk(t.port, args.connections, wrk_seconds, scripts[t.name]),
                CPU_PATHS,
            )
        else:
            await self.phase(
                f"max asyncio client, {args.connections} conns",
                rounds * 2,
                lambda i: lambda t: closed_loop(t.port, args.connections, args.duration / rounds, t.extra),
                CPU_PATHS,
            )
        await self.phase(
            f"streams {args.streams} x {args.chunks} chunks",
            rounds,
            lambda i: lambda t: streams(t.port, args.streams, args.chunks, args.duration / rounds, t.headers),
            STREAM_PATHS,
        )

    async def open_stream_phases(self, duration: float) -> None:
        """OPEN_SLICES slices of half the duration each: a p99 of one window is at the mercy of one hiccup of a
        shared machine (it hits whichever path is measured then), so the added p99 is the median of the slices'."""
        args = self.args
        count, interval, window = args.paced_streams, args.interval_ms, duration / 2
        await self.phase(
            f"{count} streams, a chunk every {interval:g} ms",
            OPEN_SLICES,
            lambda i: lambda t: paced_streams(t, count, interval, window),
            LATENCY_PATHS,
        )
        if args.stream_life:
            life = args.stream_life
            await self.phase(
                f"{count} streams, a chunk every {interval:g} ms, each replaced when it ends (~{life} chunks)",
                OPEN_SLICES,
                lambda i: lambda t: paced_streams(t, count, interval, window, life=life, seed=i),
                LATENCY_PATHS,
            )


def report(bench: Bench) -> dict[str, Any]:
    args = bench.args
    phases = {phase.name: {path: s.summary() for path, s in phase.samples.items()} for phase in bench.phases}
    load = os.getloadavg()
    print()
    print(
        f"Switchyard gateway overhead: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, --duration {args.duration:g} s per path per phase"
    )
    print(f"gateway code: {bench.revision}")
    paths = ", ".join(f"{t.name} (:{t.port})" for t in bench.targets.values())
    print(f"paths: {paths}; gateway = its defaults (access log on, to a file)")
    print(bench.pinning or "not pinned: the proxies, the client, wrk and the upstream share every CPU")
    errors = sum(sample.errors for phase in bench.phases for sample in phase.samples.values())
    if errors:
        print(f"WARNING: {errors} requests failed (see the errors columns): the figures below are not valid")
    headline: dict[str, float] = {}

    print()
    print("Latency of a small non-stream chat completion (ms), `added` = the path minus direct")
    row = "{:<24} {:<12} {:>8} {:>7} {:>8} {:>8} {:>8} {:>7} {:>9} {:>9}"
    print(row.format("phase", "path", "requests", "req/s", "p50", "p90", "p99", "errors", "added p50", "CPU µs/req"))
    for phase in bench.phases:
        if phase.name.startswith(("max", "streams")) or "streams," in phase.name:
            continue
        direct = phase.samples["direct"]
        for index, (path, sample) in enumerate(phase.samples.items()):
            added = sample.percentile_ms(50) - direct.percentile_ms(50)
            print(row.format(
                phase.name if index == 0 else "", path, sample.requests, f"{sample.rate:.0f}",
                f"{sample.percentile_ms(50):.3f}", f"{sample.percentile_ms(90):.3f}", f"{sample.percentile_ms(99):.3f}",
                sample.errors, "" if path == "direct" else f"{added:+.3f}",
                "" if path == "direct" else f"{sample.cpu_us(sample.gateway_cpu, sample.requests):.0f}",
            ))  # fmt: skip
            if path != "direct":
                phases[phase.name][path]["added_p50_ms"] = round(added, 4)
                if phase.name == "sequential":
                    headline[f"added_p50_ms_{path}"] = round(added, 4)

    for phase in bench.phases:
        if not phase.name.startswith("max"):
            continue
        print()
        print(f"Max throughput ({phase.name}); CPU is the path's own process")
        row = "{:<12} {:>9} {:>8} {:>8} {:>7} {:>12} {:>14}"
        print(row.format("path", "req/s", "p50 ms", "p99 ms", "errors", "CPU µs/req", "up CPU µs/req"))
        for path, sample in phase.samples.items():
            cpu = sample.cpu_us(sample.gateway_cpu, sample.requests)
            print(row.format(
                path, f"{sample.rate:.0f}", f"{sample.percentile_ms(50):.3f}", f"{sample.percentile_ms(99):.3f}",
                sample.errors, "" if path == "direct" else f"{cpu:.0f}",
                f"{sample.cpu_us(sample.upstream_cpu, sample.requests):.0f}",
            ))  # fmt: skip
            headline[f"max_rps_{path}"] = round(sample.rate, 1)
            if path != "direct":
                headline[f"cpu_us_per_request_{path}"] = round(cpu, 1)

    for phase in bench.phases:
        if not phase.name.startswith("streams"):
            continue
        print()
        print(f"Streams ({phase.name}, back to back)")
        row = "{:<12} {:>8} {:>11} {:>7} {:>16}"
        print(row.format("path", "streams", "chunks/s", "errors", "CPU µs/chunk"))
        for path, sample in phase.samples.items():
            cpu = sample.cpu_us(sample.gateway_cpu, sample.chunks)
            print(row.format(
                path, sample.requests, f"{sample.chunks / sample.seconds:.0f}" if sample.seconds else "-",
                sample.errors, "" if path == "direct" else f"{cpu:.2f}",
            ))  # fmt: skip
            if path != "direct":
                headline[f"cpu_us_per_chunk_{path}"] = round(cpu, 2)

    for phase in bench.phases:
        if "streams," not in phase.name:
            continue
        print()
        churn = "replaced" in phase.name
        print(
            f"Open streams ({phase.name}): gap between chunks at the client, ms, over all slices; `added p99` = the"
            " median over the slices of the path's p99 minus direct's in the same slice; proxy memory per open stream"
        )
        row = "{:<12} {:>8} {:>7} {:>9} {:>8} {:>8} {:>8} {:>10} {:>24} {:>11}"
        print(row.format(
            "path", "ended" if churn else "streams", "errors", "chunks", "p50", "p99", "p99.9", "added p99",
            "added p99 of each slice", "KiB/stream",
        ))  # fmt: skip
        direct = phase.samples["direct"]
        for path, sample in phase.samples.items():
            each = [p99 - base for p99, base in zip(sample.slice_gap_p99, direct.slice_gap_p99, strict=False)]
            added = statistics.median(each) if each else float("nan")
            print(row.format(
                path, sample.requests, sample.errors, sample.chunks, f"{sample.gap_ms(50):.2f}",
                f"{sample.gap_ms(99):.2f}", f"{sample.gap_ms(99.9):.2f}", "" if path == "direct" else f"{added:+.2f}",
                "" if path == "direct" else " ".join(f"{value:+.1f}" for value in each),
                "" if path == "direct" or churn else f"{sample.rss_per_stream / 1024:.1f}",
            ))  # fmt: skip
            if path == "direct":
                continue
            if churn:  # its memory is the fixed phase's, already grown: not shown
                headline[f"stream_gap_added_p99_ms_churn_{path}"] = round(added, 3)
            else:
                headline[f"stream_gap_added_p99_ms_{path}"] = round(added, 3)
                headline[f"stream_memory_kib_{path}"] = round(sample.rss_per_stream / 1024, 1)

    goals = goal_lines(headline)
    if goals:
        print()
        print("Goals (issue: the hot path at a Rust router's cost), from this one run")
        for line in goals:
            print(line)
    headline["errors"] = float(errors)
    if errors:
        print("\nINVALID RUN (requests failed).")
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "loadavg_end": list(load)},
        "settings": {k: str(v) for k, v in vars(args).items() if k != "json"},
        "gateway_revision": bench.revision,
        "client": "wrk" if bench.wrk_scripts is not None else "asyncio",
        "headline": headline,
        "phases": phases,
    }


def goal_lines(h: dict[str, float]) -> list[str]:
    lines = []

    def check(label: str, value: float | None, bar: str, ok: bool | None) -> None:
        verdict = "n/a" if ok is None or value is None else ("MET" if ok else "MISSED")
        shown = "-" if value is None else f"{value:.2f}"
        lines.append(f"- {label}: {shown} ({bar}): {verdict}")

    gw, vr = h.get("cpu_us_per_request_gateway"), h.get("cpu_us_per_request_vllm-router")
    if gw is not None and vr:
        check("CPU per request, gateway / vllm-router", gw / vr, "<= 1.25, moonshot 1.0", gw / vr <= 1.25)
    added, added_vr = h.get("added_p50_ms_gateway"), h.get("added_p50_ms_vllm-router")
    if added is not None and added_vr:
        check("added p50 one at a time, gateway / vllm-router", added / added_vr, "<= 1.25", added / added_vr <= 1.25)
    rps, rps_vr = h.get("max_rps_gateway"), h.get("max_rps_vllm-router")
    if rps is not None and rps_vr:
        check("max req/s, gateway / vllm-router", rps / rps_vr, ">= 0.6", rps / rps_vr >= 0.6)
    nolog = h.get("cpu_us_per_request_no-log")
    if gw is not None and nolog is not None:
        check("access log cost, µs per request", gw - nolog, "<= 10", gw - nolog <= 10)
    keys = h.get("cpu_us_per_request_keys")
    if gw is not None and keys is not None:
        check("API keys + rpm/tpm limits, CPU / open", keys / gw, "<= 1.10", keys / gw <= 1.10)
    plain = h.get("cpu_us_per_request_round-robin")
    if gw is not None and plain:
        check("default policy, CPU / round_robin's (short prompts)", gw / plain, "<= 1.05", gw / plain <= 1.05)
    tracing = h.get("cpu_us_per_request_tracing")
    if gw is not None and tracing is not None:
        check("tracing on, CPU / off", tracing / gw, "reported", None if tracing is None else True)
    chunk, chunk_off = h.get("cpu_us_per_chunk_gateway"), h.get("cpu_us_per_chunk_no-failover")
    if chunk is not None and chunk_off:
        check("stream failover watch, CPU per chunk on / off", chunk / chunk_off, "reported", True)
    gap, memory = h.get("stream_gap_added_p99_ms_gateway"), h.get("stream_memory_kib_gateway")
    if gap is not None:
        check("open streams, added inter-chunk p99 ms", gap, "<= 5", gap <= 5)
    if memory is not None:
        check("open streams, gateway KiB per stream", memory, "<= 64", memory <= 64)
    gap = h.get("stream_gap_added_p99_ms_churn_gateway")
    if gap is not None:
        check("open streams, each replaced when it ends: added inter-chunk p99 ms", gap, "<= 5", gap <= 5)
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Gateway overhead: the same load direct to a fast upstream, through the gateway, and through "
        "vllm-router, side by side in one run."
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per path per phase (default 10)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 s phases, short warm-up, 200 chunks")
    parser.add_argument("--json", metavar="OUT", type=Path, help="also write every figure to this JSON file")
    parser.add_argument("--rate", type=float, default=200.0, help="open-loop arrivals per second (default 200)")
    parser.add_argument("--connections", type=int, default=64, help="connections for max throughput (default 64)")
    parser.add_argument("--streams", type=int, default=4, help="concurrent streams (default 4)")
    parser.add_argument("--chunks", type=int, default=1000, help="SSE chunks per stream (default 1000)")
    parser.add_argument("--paced-streams", type=int, default=2000, help="streams held open at once (0: skip)")
    parser.add_argument("--interval-ms", type=float, default=100.0, help="their chunk interval (default 100)")
    parser.add_argument(
        "--stream-life", type=int, default=100,
        help="chunks per stream in the churning open-streams phase, +-50%% (default 100; 0: skip the phase)",
    )  # fmt: skip
    parser.add_argument(
        "--phases", default="latency,throughput,open",
        help="comma-separated groups to run: latency (one at a time, open loop), throughput (max req/s, "
        "stream bursts), open (2,000 open streams) (default: all)",
    )  # fmt: skip
    parser.add_argument("--no-wrk", action="store_true", help="use the asyncio client even when wrk is installed")
    parser.add_argument("--vllm-router", default=VLLM_ROUTER, help=f"its binary (default {VLLM_ROUTER})")
    parser.add_argument(
        "--install-vllm-router", action="store_true",
        help=f"install vllm-router {VLLM_ROUTER_VERSION} into {VLLM_ROUTER_VENV} first when it is missing",
    )  # fmt: skip
    parser.add_argument("--only", default=None, help="comma-separated paths to run (direct is always in)")
    parser.add_argument("--tracing", action="store_true", help="add a path with tracing on (an unreachable collector)")
    parser.add_argument(
        "--pin", action="store_true",
        help="run each proxy (the gateway paths, vllm-router and its threads) on one CPU, and the client, wrk "
        "and the upstream on the others (Linux): the load generator then never takes the proxy's core",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.duration = min(args.duration, 2.0)
        args.chunks = min(args.chunks, 200)
        args.paced_streams = min(args.paced_streams, 200)
        args.stream_life = min(args.stream_life, 6)  # streams end within its 1 s windows
    unknown = set(args.phases.split(",")) - {"latency", "throughput", "open"}
    if unknown:
        parser.error(f"--phases: unknown {', '.join(sorted(unknown))} (latency, throughput, open)")
    if args.duration <= 0 or args.rate <= 0 or args.connections < 1 or args.streams < 1 or args.chunks < 1:
        parser.error("--duration, --rate, --connections, --streams and --chunks must be positive")
    return args


VLLM_ROUTER_VERSION = "0.1.17"
VLLM_ROUTER_VENV = Path("/tmp/vr-venv")
VLLM_ROUTER = str(VLLM_ROUTER_VENV / "bin" / "vllm-router")


def install_vllm_router() -> None:
    """vllm-router in a venv of its own (its dependencies are not the gateway's)."""
    print(f"installing vllm-router {VLLM_ROUTER_VERSION} into {VLLM_ROUTER_VENV} ...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(VLLM_ROUTER_VENV)], check=True)
    pip = [str(VLLM_ROUTER_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, f"vllm-router=={VLLM_ROUTER_VERSION}"], check=True)


@contextlib.contextmanager
def sigterm_exits() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C does, so the children are stopped on the way out."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


BENCH_KEY = "sk-bench-overhead"


def gateway_configs(upstream_port: int, tracing: bool) -> dict[str, str]:
    backend = f'backends:\n  - url: "http://127.0.0.1:{upstream_port}"\n'
    keys = (
        "auth:\n  keys:\n    - {name: bench, key_env: SWITCHYARD_BENCH_KEY, requests_per_minute: 100000000,"
        " tokens_per_minute: 1000000000}\n"
    )
    configs = {
        "gateway": backend,
        "no-log": backend + "access_log: false\n",
        "keys": backend + keys,
        "no-failover": backend + "failover: {enabled: false}\n",
        "round-robin": backend + "routing: {policy: round_robin}\n",
    }
    if tracing:
        configs["tracing"] = backend + "tracing: {enabled: true}\n"
    return configs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    use_wrk = shutil.which("wrk") is not None and not args.no_wrk
    if not use_wrk and not args.no_wrk:
        print("wrk not found: using the asyncio client for max throughput", file=sys.stderr)
    if args.install_vllm_router and not Path(args.vllm_router).exists():
        install_vllm_router()
    router = args.vllm_router if Path(args.vllm_router).exists() else None
    if router is None:
        print(f"vllm-router not found at {args.vllm_router}: its path is left out (--install-vllm-router)",
              file=sys.stderr)  # fmt: skip
    only = set(args.only.split(",")) if args.only else None
    proxy_cpus: set[int] | None = None
    pinning = None
    if args.pin:
        proxy_cpus, load_cpus = cpu_split()
        os.sched_setaffinity(0, load_cpus)  # the client, and wrk and the upstream after it
        pinning = (f"pinned (--pin): each proxy on CPU {min(proxy_cpus)}, the client, wrk and the upstream on "
                   f"CPU {', '.join(map(str, sorted(load_cpus)))}")  # fmt: skip
    with sigterm_exits(), tempfile.TemporaryDirectory(prefix="switchyard-bench-") as tmp, Children(Path(tmp)) as kids:
        workdir = Path(tmp)
        upstream_port = free_port()
        upstream = kids.start(
            "upstream",
            [sys.executable, str(HERE / "fast_upstream.py"), "--port", str(upstream_port), "--model", MODEL],
        )
        wait_ready(kids, "upstream", upstream, f"http://127.0.0.1:{upstream_port}/v1/models", 30)
        targets = {"direct": Target("direct", upstream_port, 0)}
        env = {**os.environ, "SWITCHYARD_BENCH_KEY": BENCH_KEY, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}
        for name, text in gateway_configs(upstream_port, args.tracing).items():
            if only is not None and name not in only:
                continue
            config = workdir / f"{name}.yaml"
            config.write_text(text)
            port = free_port()
            proc = kids.start(
                name,
                [sys.executable, "-m", "gateway", "--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
                env=env,
                cpus=proxy_cpus,
            )
            wait_ready(kids, name, proc, f"http://127.0.0.1:{port}/ready", 30)
            extra = f"Authorization: Bearer {BENCH_KEY}\r\n" if name == "keys" else ""
            targets[name] = Target(name, port, proc.pid, extra)
        if router is not None and (only is None or "vllm-router" in only):
            port = free_port()
            proc = kids.start("vllm-router", [
                router, "--worker-urls", f"http://127.0.0.1:{upstream_port}", "--policy", "round_robin",
                "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
            ], cpus=proxy_cpus)  # fmt: skip
            wait_ready(kids, "vllm-router", proc, f"http://127.0.0.1:{port}/health", 60)
            targets["vllm-router"] = Target("vllm-router", port, proc.pid)
        scripts = None
        if use_wrk:
            scripts = {}
            for name, target in targets.items():
                script = workdir / f"post-{name}.lua"
                header = f'wrk.headers["Authorization"] = "Bearer {BENCH_KEY}"\n' if target.extra else ""
                script.write_text(WRK_SCRIPT.replace("@BODY@", SMALL_BODY.decode()) + header)
                scripts[name] = script
        bench = Bench(args=args, targets=targets, upstream_pid=upstream.pid, wrk_scripts=scripts,
                      revision=gateway_revision(), pinning=pinning)  # fmt: skip
        uvloop.run(bench.run())
        for name in ("upstream", *targets):
            if name != "direct":
                proc_ok = kids.alive(name)
                if not proc_ok:
                    raise SystemExit(f"{name} died during the run:\n{kids.log_tail(name)}")
        results = report(bench)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"saved {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the children are already stopped by then
        print("interrupted", file=sys.stderr)
        sys.exit(130)
