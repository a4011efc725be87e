"""Can one simulator process carry thousands of concurrent streams and keep to its own model?

Run (from the repository root, with the venv's Python):

    .venv/bin/python bench/sim_capacity.py                      # levels 1,100,500,1000,2000 (~2 minutes)
    .venv/bin/python bench/sim_capacity.py --levels 2000 --max-num-seqs 2048 --max-num-batched-tokens 8192
    .venv/bin/python bench/sim_capacity.py --count 8 --levels 200,800   # 8 servers in one process

It starts one `python -m worker.sim` child on free loopback ports (default engine settings unless
overridden; `--count K` servers, streams spread round-robin), then for each concurrency level N
sends N streamed /v1/completions requests at once (aiohttp, one connection each; distinct prompts
of --prompt-tokens, `ignore_eos` so each yields exactly --max-tokens tokens) and records, per
request, when it was sent, when its first
SSE event arrived (TTFT) and when `[DONE]` arrived (e2e).

The prediction replays the same requests, at the same send times, through the engine model on a
virtual clock (`worker.sim.replay`): it is what the model says the timings should be. A measured
mean within 10% of the predicted mean means the HTTP layer and event loop keep up at that load.
`lag` is the simulator's own view (sim:* metrics): how late, on average, its engine steps ended
against the model's timeline during the level; a small lag with a large TTFT deviation points at
the client (this process, on the same cores) rather than the server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker.sim.config import SimConfig
from worker.sim.engine import SimRequest
from worker.sim.replay import replay
from worker.sim.text import tokenize


@dataclass
class Sample:
    prompt: str
    url: str
    sent: float = 0.0
    first: float | None = None
    done: float | None = None
    tokens: int = 0
    error: str | None = None


async def _body_sent(session: object, ctx: SimpleNamespace, params: object) -> None:
    # a request counts as sent once its body is written: with thousands of requests started at
    # once the client needs a while to write them all, and that is not the server's time
    ctx.trace_request_ctx.sent = time.perf_counter()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument(
        "--url", default=None, help="use simulators already running there (comma-separated URLs; same engine flags!)"
    )
    p.add_argument(
        "--count",
        type=int,
        default=1,
        help="simulated servers in the one simulator process; streams are spread round-robin",
    )
    p.add_argument("--levels", default="1,100,500,1000,2000", help="comma-separated concurrency levels")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-num-seqs", type=int, default=SimConfig.max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=int, default=SimConfig.max_num_batched_tokens)
    p.add_argument("--decode-ms-per-token", type=float, default=SimConfig.decode_ms_per_token)
    p.add_argument("--prefill-ms-per-token", type=float, default=SimConfig.prefill_ms_per_token)
    p.add_argument("--decode-batch-factor", type=float, default=SimConfig.decode_batch_factor)
    return p.parse_args()


def sim_config(ns: argparse.Namespace) -> SimConfig:
    return SimConfig(served_model_name="bench", max_num_seqs=ns.max_num_seqs,
                     max_num_batched_tokens=ns.max_num_batched_tokens,
                     decode_ms_per_token=ns.decode_ms_per_token, prefill_ms_per_token=ns.prefill_ms_per_token,
                     decode_batch_factor=ns.decode_batch_factor)  # fmt: skip


def free_port_run(count: int) -> int:
    for base in range(21000, 60000, 101):
        socks: list[socket.socket] = []
        try:
            for i in range(count):
                socks.append(socket.socket())
                socks[-1].bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise SystemExit("no run of free ports")


@contextlib.contextmanager
def simulator(cfg: SimConfig, urls: str | None, count: int) -> Iterator[list[str]]:
    if urls:
        yield urls.split(",")
        return
    ports = ["--port", "0"] if count == 1 else ["--count", str(count), "--port-base", str(free_port_run(count))]
    cmd = [sys.executable, "-m", "worker.sim", "--served-model-name", cfg.served_model_name, *ports,
           "--max-num-seqs", str(cfg.max_num_seqs), "--max-num-batched-tokens", str(cfg.max_num_batched_tokens),
           "--decode-ms-per-token", str(cfg.decode_ms_per_token),
           "--prefill-ms-per-token", str(cfg.prefill_ms_per_token),
           "--decode-batch-factor", str(cfg.decode_batch_factor)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        found = [re.search(r"on (http://\S+)", proc.stdout.readline()) for _ in range(count)]
        if not all(found):
            raise SystemExit("the simulator did not start")
        yield [m.group(1) for m in found if m is not None]
    finally:
        proc.terminate()
        proc.wait(10)


def make_prompt(label: str, i: int, tokens: int) -> str:
    head = f"{label} request {i}: "  # distinct first block: no prefix sharing between requests
    return (head + "lorem ipsum dolor sit amet " * (tokens // 4 + 1))[: tokens * 4]


async def one_stream(session: aiohttp.ClientSession, sample: Sample, max_tokens: int) -> None:
    body = {"model": "bench", "prompt": sample.prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    sample.sent = time.perf_counter()
    try:
        async with session.post(sample.url + "/v1/completions", json=body, trace_request_ctx=sample) as resp:
            if resp.status != 200:
                sample.error = f"HTTP {resp.status}"
                return
            # raw reads, counting events: per-line parsing of thousands of streams would make the
            # client, not the server, the bottleneck
            tail = b""
            async for data in resp.content.iter_any():
                now = time.perf_counter()
                if sample.first is None:
                    sample.first = now
                sample.tokens += data.count(b"data: ")
                tail = (tail + data)[-16:]
                if tail.endswith(b"data: [DONE]\n\n"):
                    sample.tokens -= 1
                    sample.done = now
                    return
        sample.error = "stream ended without [DONE]"
    except (aiohttp.ClientError, TimeoutError) as exc:
        sample.error = type(exc).__name__


async def run_level(urls: list[str], level: int, ns: argparse.Namespace, label: str) -> tuple[list[Sample], float]:
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=120)
    timeout = aiohttp.ClientTimeout(total=600)
    tracing = aiohttp.TraceConfig()
    tracing.on_request_chunk_sent.append(_body_sent)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trace_configs=[tracing]) as session:
        # no pre-opened connections (the server closes idle ones after 5 s, as vLLM does): a request's
        # clock starts when its body is written, after its connection is up
        samples = [Sample(make_prompt(label, i, ns.prompt_tokens), urls[i % len(urls)]) for i in range(level)]
        start = time.perf_counter()
        await asyncio.gather(*(one_stream(session, s, ns.max_tokens) for s in samples))
        return samples, time.perf_counter() - start


def server_lag(urls: list[str]) -> tuple[float, float]:
    """(summed step lateness in s, steps) over all servers, from the simulator's own sim:* metrics."""
    values: dict[str, float] = {}
    for url in urls:
        text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
        for line in text.splitlines():
            if line.startswith(("sim:step_lag_seconds_total", "sim:engine_steps_total")):
                name = line.split("{", 1)[0]
                values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return values.get("sim:step_lag_seconds_total", 0.0), values.get("sim:engine_steps_total", 0.0)


def predict(cfg: SimConfig, samples: list[Sample], max_tokens: int) -> list[SimRequest]:
    """The model's timings for `samples`, in order; each server is its own engine."""
    t0 = min(s.sent for s in samples)
    reqs = [SimRequest(str(i), tokenize(s.prompt), max_tokens) for i, s in enumerate(samples)]
    for url in {s.url for s in samples}:
        replay(cfg, [(s.sent - t0, r) for s, r in zip(samples, reqs, strict=True) if s.url == url])
    return reqs


def p90(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=10)[-1] if len(xs) > 1 else xs[0]


def pct(measured: float, predicted: float) -> float:
    return 100.0 * (measured - predicted) / predicted if predicted else 0.0


def main() -> int:
    ns = parse_args()
    cfg = sim_config(ns)
    levels = [int(x) for x in ns.levels.split(",")]
    print(f"{ns.count} server(s); engine: max_num_seqs={cfg.max_num_seqs} "
          f"max_num_batched_tokens={cfg.max_num_batched_tokens} "
          f"decode={cfg.decode_ms_per_token}ms/token "
          f"prefill={cfg.prefill_ms_per_token}ms/token batch_factor={cfg.decode_batch_factor}; "
          f"requests: {ns.prompt_tokens} prompt tokens, {ns.max_tokens} output tokens (ignore_eos)")  # fmt: skip
    header = (f"{'conc':>5} {'err%':>5} {'tok/s':>7} | {'TTFT pred':>9} {'meas':>7} {'Δ%':>6} | "
              f"{'e2e pred':>8} {'meas':>7} {'Δ%':>6} | {'p90 e2e pred':>12} {'meas':>7} | "
              f"{'lag':>6} | within 10%")  # fmt: skip
    rows = [header, "-" * len(header)]
    with simulator(cfg, ns.url, ns.count) as urls:
        asyncio.run(run_level(urls, len(urls), ns, "warm-up"))  # warm-up: first-call costs stay out of the table
        for level in levels:
            # small levels run several rounds (one after another) so each row averages >= 20 requests
            samples, wall, by_prompt = [], 0.0, {}
            lag_before, steps_before = server_lag(urls)
            for round_no in range(max(1, -(-20 // level))):
                batch, took = asyncio.run(run_level(urls, level, ns, f"level {level} round {round_no}"))
                predicted = predict(cfg, batch, ns.max_tokens)
                by_prompt.update({id(s): r for s, r in zip(batch, predicted, strict=True)})
                samples += batch
                wall += took
            lag_after, steps_after = server_lag(urls)
            lag_ms = 1e3 * (lag_after - lag_before) / max(steps_after - steps_before, 1)
            ok = [s for s in samples if s.error is None and s.first is not None and s.done is not None]
            errors = 100.0 * (len(samples) - len(ok)) / len(samples)
            p_ttft = [(r.first_token_at or 0) - r.arrival for r in (by_prompt[id(s)] for s in ok)]
            p_e2e = [(r.finished_at or 0) - r.arrival for r in (by_prompt[id(s)] for s in ok)]
            m_ttft = [(s.first or 0) - s.sent for s in ok]
            m_e2e = [(s.done or 0) - s.sent for s in ok]
            ok_ids = {id(s) for s in ok}
            failures = Counter(s.error or "no first token / [DONE]" for s in samples if id(s) not in ok_ids)
            if failures:
                print(f"level {level}: failures {dict(failures)}", flush=True)
            if not ok:
                rows.append(f"{level:>5} {errors:>5.1f}  all requests failed: {failures.most_common(1)}")
                continue
            d_ttft = pct(statistics.mean(m_ttft), statistics.mean(p_ttft))
            d_e2e = pct(statistics.mean(m_e2e), statistics.mean(p_e2e))
            within = "yes" if abs(d_ttft) <= 10 and abs(d_e2e) <= 10 and errors == 0 else "NO"
            tok_s = sum(s.tokens for s in ok) / wall
            rows.append(
                f"{level:>5} {errors:>5.1f} {tok_s:>7.0f} | {statistics.mean(p_ttft) * 1e3:>7.1f}ms "
                f"{statistics.mean(m_ttft) * 1e3:>5.1f}ms {d_ttft:>+5.1f}% | {statistics.mean(p_e2e):>7.3f}s "
                f"{statistics.mean(m_e2e):>6.3f}s {d_e2e:>+5.1f}% | {p90(p_e2e):>11.3f}s {p90(m_e2e):>6.3f}s | "
                f"{lag_ms:>4.1f}ms | "
                f"{within}"
            )  # fmt: skip
            print(rows[-1] if len(rows) > 3 else "\n".join(rows), flush=True)
    print("\n" + "\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
