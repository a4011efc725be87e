"""Soak: a long run of mixed requests through the gateway, watching its memory (issue 8: RSS growth under
10% after warm-up).

Run (from the repository root, with the venv's Python):

    .venv/bin/python bench/soak.py                      # 100,000 requests
    .venv/bin/python bench/soak.py --requests 20000     # a shorter run

It starts, on 127.0.0.1 free ports: three simulators of one model `chat` (`python -m worker.sim`; the third
answers 5% of generation requests with a 503, which the gateway retries on the others) and the gateway
(`python -m gateway --config FILE`, static discovery). All are killed when the run ends or fails.

The client (aiohttp, --concurrency workers) sends a fixed mix, drawn from a seeded generator:
chat stream 30%, chat non-stream 20%, completions 15% (half streaming), embeddings 15%, aborted streams 8%
(read the first chunk, then drop the connection), unknown model 6% (404 expected), malformed JSON 6% (400
expected). Each request is judged: `ok` (the expected status and a complete answer: `[DONE]` for a stream),
`expected error` (the 404/400 asked for), `aborted` (the client hung up as planned), or a failure:
`http 5xx`, `http other` or `client error` (a timeout, a reset, a truncated stream).

The gateway's RSS (/proc/PID/status VmRSS) is read once the warm-up (--warmup requests, default 10%) is done,
every 2 s during the run, and at the end after the gateway has gone idle; growth = end / after warm-up - 1.
The exit status is 0 when growth < 10% and no request failed, else 1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import yaml

ROOT = Path(__file__).resolve().parents[1]
MODEL = "chat"
KINDS = (
    ("chat_stream", 30),
    ("chat", 20),
    ("completion", 15),
    ("embedding", 15),
    ("abort", 8),
    ("unknown_model", 6),
    ("bad_json", 6),
)
FAILURES = ("http 5xx", "http other", "client error")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 200 within {timeout:g} s")


@contextmanager
def child(argv: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: a chatty child never blocks on it
        process = subprocess.Popen(argv, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=log)
        try:
            yield process
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
            if process.returncode not in (0, -signal.SIGKILL):
                log.seek(0)
                print(f"{argv[2]} exited with {process.returncode}: {log.read().decode()[-2000:]}", file=sys.stderr)


def simulator(port: int, *flags: str) -> list[str]:
    timing = ["--prefill-ms-per-token", "0.01", "--decode-ms-per-token", "1"]
    return [sys.executable, "-m", "worker.sim", "--served-model-name", MODEL, "--port", str(port), *timing, *flags]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def request_for(kind: str, number: int) -> tuple[str, bytes, int, bool]:
    """(path, body, expected status, streams?)"""
    prompt = f"soak request {number}: tell me about wagon {number % 97}"
    chat = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 16}
    if kind == "chat_stream":
        return "/v1/chat/completions", orjson.dumps({**chat, "stream": True}), 200, True
    if kind == "chat":
        return "/v1/chat/completions", orjson.dumps(chat), 200, False
    if kind == "completion":
        stream = number % 2 == 0
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 16, "stream": stream}
        return "/v1/completions", orjson.dumps(body), 200, stream
    if kind == "embedding":
        return "/v1/embeddings", orjson.dumps({"model": MODEL, "input": [prompt, "yard"]}), 200, False
    if kind == "abort":
        body = {**chat, "max_tokens": 200, "ignore_eos": True, "stream": True}
        return "/v1/chat/completions", orjson.dumps(body), 200, True
    if kind == "unknown_model":
        return "/v1/chat/completions", orjson.dumps({**chat, "model": f"missing-{number % 5}"}), 404, False
    return "/v1/chat/completions", b'{"model": "chat", "messages": [' + str(number).encode(), 400, False


@dataclass
class Tally:
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    done: int = 0

    def add(self, kind: str, outcome: str, detail: str = "") -> None:
        self.outcomes[(kind, outcome)] += 1
        self.done += 1
        if outcome in FAILURES and outcome not in self.examples:
            self.examples[outcome] = f"{kind}: {detail[:300]}"


async def one(session: aiohttp.ClientSession, url: str, kind: str, number: int, tally: Tally) -> None:
    path, body, expected, stream = request_for(kind, number)
    try:
        async with session.post(url + path, data=body, headers={"content-type": "application/json"}) as response:
            if kind == "abort" and response.status == 200:
                await response.content.readany()
                response.close()
                tally.add(kind, "aborted")
                return
            data = await response.read()
            if response.status == expected == 200:
                complete = data.rstrip().endswith(b"data: [DONE]") and b'"error"' not in data if stream else True
                tally.add(kind, "ok" if complete else "client error", data[-300:].decode(errors="replace"))
            elif response.status == expected:
                tally.add(kind, "expected error")
            elif response.status >= 500:
                tally.add(kind, "http 5xx", f"{response.status} {data[:200]!r}")
            else:
                tally.add(kind, "http other", f"{response.status} {data[:200]!r}")
    except (aiohttp.ClientError, TimeoutError) as exc:
        tally.add(kind, "client error", f"{exc.__class__.__name__}: {exc}")


async def drive(url: str, total: int, concurrency: int, seed: int, tally: Tally) -> float:
    rng = random.Random(seed)
    names, weights = zip(*KINDS, strict=True)
    plan = rng.choices(names, weights, k=total)
    numbers = iter(range(total))
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=3)
    started = time.monotonic()
    async with aiohttp.ClientSession(timeout=timeout, connector=connector, auto_decompress=False) as session:

        async def worker() -> None:
            for number in numbers:
                await one(session, url, plan[number], number, tally)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.monotonic() - started


async def sample_rss(pid: int, tally: Tally, warmup: int, samples: list[tuple[int, int]], stop: asyncio.Event) -> None:
    while not stop.is_set():
        if tally.done >= warmup:
            samples.append((tally.done, rss_kib(pid)))
        with suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 2.0)


async def soak(url: str, pid: int, args: argparse.Namespace, tally: Tally) -> tuple[float, int, list[tuple[int, int]]]:
    warmup = args.warmup if args.warmup is not None else max(1, args.requests // 10)
    warm_tally = Tally()
    await drive(url, warmup, args.concurrency, args.seed + 1, warm_tally)
    for key, count in warm_tally.outcomes.items():  # warm-up failures count too
        if key[1] in FAILURES:
            tally.outcomes[("warm-up " + key[0], key[1])] += count
    rss_warm = rss_kib(pid)
    samples: list[tuple[int, int]] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_rss(pid, tally, 0, samples, stop))
    seconds = await drive(url, args.requests, args.concurrency, args.seed, tally)
    stop.set()
    await sampler
    return seconds, rss_warm, samples


def gateway_sum(url: str, name: str) -> float:
    """Sum of one metric over its label sets on the gateway's /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def wait_idle(url: str, timeout: float = 10.0) -> float:
    """Seconds until the gateway reports no request in flight."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if gateway_sum(url, "switchyard_inflight_requests") == 0:
            return time.monotonic() - started
        time.sleep(0.1)
    raise RuntimeError("the gateway still has requests in flight")


def report(
    args: argparse.Namespace, tally: Tally, seconds: float, rss: dict[str, int], peak: int, upstream: dict[str, float]
) -> bool:
    growth = rss["end"] / rss["warm"] - 1
    failures = sum(count for (_, outcome), count in tally.outcomes.items() if outcome in FAILURES)
    print()
    print(f"soak: {args.requests:,} requests after {rss['warmup_requests']:,} warm-up, concurrency {args.concurrency}")
    print()
    print("| figure | value |")
    print("|---|---|")
    print(f"| requests/s | {args.requests / seconds:,.0f} |")
    print(f"| duration | {seconds:,.1f} s |")
    print(f"| gateway RSS at start | {rss['start'] / 1024:.1f} MiB |")
    print(f"| gateway RSS after warm-up | {rss['warm'] / 1024:.1f} MiB |")
    print(f"| gateway RSS peak during run | {peak / 1024:.1f} MiB |")
    print(f"| gateway RSS at end (idle) | {rss['end'] / 1024:.1f} MiB |")
    print(f"| RSS growth after warm-up | {growth * 100:+.1f}% (limit +10%) |")
    print(f"| failed requests | {failures} |")
    print(f"| retries to another backend (warm-up included) | {upstream['retries']:,.0f} |")
    print(f"| upstream errors seen by the gateway, all kinds | {upstream['errors']:,.0f} |")
    print()
    outcomes = sorted({outcome for _, outcome in tally.outcomes})
    print("| kind | " + " | ".join(outcomes) + " |")
    print("|---|" + "---|" * len(outcomes))
    for kind in sorted({kind for kind, _ in tally.outcomes}):
        print(f"| {kind} | " + " | ".join(f"{tally.outcomes[(kind, o)]:,}" for o in outcomes) + " |")
    for outcome, example in tally.examples.items():
        print(f"first {outcome}: {example}")
    passed = growth < 0.10 and failures == 0
    print()
    print("PASS" if passed else "FAIL")
    return passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000, help="requests measured after the warm-up")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up requests (default: 10%% of --requests)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seed", type=int, default=8)
    args = parser.parse_args(argv)

    ports = [free_port() for _ in range(4)]
    sims, gateway_port = ports[:3], ports[3]
    config = {
        "backends": [{"url": f"http://127.0.0.1:{port}"} for port in sims],
        "log_level": "warning",
        "access_log": False,
    }
    with ExitStack() as stack, tempfile.NamedTemporaryFile("w", suffix=".yaml") as config_file:
        yaml.safe_dump(config, config_file)
        config_file.flush()
        for port in sims[:2]:
            stack.enter_context(child(simulator(port)))
        stack.enter_context(child(simulator(sims[2], "--fail-rate", "0.05", "--fail-status", "503")))
        for port in sims:
            wait_for(f"http://127.0.0.1:{port}/health")
        listen = ["--host", "127.0.0.1", "--port", str(gateway_port)]
        gw = stack.enter_context(child([sys.executable, "-m", "gateway", "--config", config_file.name, *listen]))
        url = f"http://127.0.0.1:{gateway_port}"
        wait_for(url + "/ready")
        rss_start = rss_kib(gw.pid)
        tally = Tally()
        seconds, rss_warm, samples = asyncio.run(soak(url, gw.pid, args, tally))
        wait_idle(url)
        rss = {
            "start": rss_start,
            "warm": rss_warm,
            "end": rss_kib(gw.pid),
            "warmup_requests": args.warmup if args.warmup is not None else max(1, args.requests // 10),
        }
        peak = max([rss["end"], *(value for _, value in samples)])
        upstream = {
            "retries": gateway_sum(url, "switchyard_retries_total"),
            "errors": gateway_sum(url, "switchyard_upstream_errors_total"),
        }
        return 0 if report(args, tally, seconds, rss, peak, upstream) else 1


if __name__ == "__main__":
    sys.exit(main())
