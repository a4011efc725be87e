"""Command line of the simulator: `python -m worker.sim` / `switchyard sim`.

`--count K --port-base P` runs K independent simulated servers (ports P..P+K-1) on one event loop
in one process; each has its own engine, metrics registry and adapters.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Callable, Iterator

import uvicorn

from worker.sim.config import ConfigError, SimConfig
from worker.sim.server import RUNTIME_LORA_ENV, create_sim_app

DEFAULTS = SimConfig()


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = argparse.ArgumentParser(
        prog="python -m worker.sim",
        description="Simulated vLLM OpenAI-compatible server(s): vLLM's routes, SSE framing, errors and "
        "metrics, driven by an engine model (continuous batching, chunked prefill, prefix-cached KV blocks, "
        "LoRA slots). Step time in ms = decode_ms_per_token * (1 + decode_batch_factor * (batch - 1)) + "
        "prefill_ms_per_token * prompt_tokens_computed_in_the_step + lora_load_ms * adapters_loaded_in_the_step, "
        "batch being the requests in the step; a step handles at most --max-num-batched-tokens tokens (1 per "
        "decoding request, prompts are chunked). Tokens are ~4 characters. See worker/sim/README.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = p.add_argument
    a("--served-model-name", required=True, help="model name clients send as `model`")
    a("--model", default=None, help="base model path shown as `root` in /v1/models; unset: the served name")
    a("--lora", action="append", default=[], metavar="NAME[=PATH]", help="static LoRA adapter (repeatable)")
    a("--max-loras", type=int, default=d.max_loras, help="distinct adapters allowed in the running batch")
    a("--max-num-seqs", type=int, default=d.max_num_seqs, help="running requests at most; others wait FIFO")
    a("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens,
      help="token budget of one engine step: decodes take 1, prefills are chunked into the rest")  # fmt: skip
    a("--num-gpu-blocks", type=int, default=d.num_gpu_blocks, help="KV cache blocks")
    a("--block-size", type=int, default=d.block_size, help="tokens per KV block")
    a("--max-model-len", type=int, default=d.max_model_len, help="prompt + output tokens at most (else 400)")
    a("--prefill-ms-per-token", type=float, default=d.prefill_ms_per_token, help="cost of an uncached prompt token")
    a("--decode-ms-per-token", type=float, default=d.decode_ms_per_token, help="decode step time at batch 1")
    a("--decode-batch-factor", type=float, default=d.decode_batch_factor,
      help="decode step time grows by this fraction per extra running request")  # fmt: skip
    a("--lora-load-ms", type=float, default=d.lora_load_ms, help="cost of loading an adapter into a GPU slot")
    a("--embedding-dim", type=int, default=d.embedding_dim, help="length of /v1/embeddings vectors")
    a("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1/* (401 otherwise)")
    a("--allow-runtime-lora", action="store_true",
      help=f"enable /v1/load_lora_adapter and /v1/unload_lora_adapter (also: env {RUNTIME_LORA_ENV}=1)")  # fmt: skip
    a("--seed", type=int, default=d.seed, help="seed for unseeded sampling and fault draws")
    a("--host", default=d.host, help="address to bind (0.0.0.0 in a container)")
    a("--port", type=int, default=d.port, help="port to bind (0: any free port; printed at startup)")
    a("--count", type=int, default=1, help="run this many independent servers in this process")
    a("--port-base", type=int, default=None, help="first port with --count; unset: --port")
    f = p.add_argument_group("fault injection")
    f.add_argument(
        "--fail-rate",
        type=float,
        default=0.0,
        help="fraction of generation requests answered with --fail-status and an OpenAI error body",
    )
    f.add_argument("--fail-status", type=int, default=500, help="HTTP status of injected failures")
    f.add_argument(
        "--stall-after-tokens",
        type=int,
        default=None,
        help="stream N tokens, then send nothing more and keep the connection open (non-streamed: no answer)",
    )
    f.add_argument(
        "--drop-after-tokens",
        type=int,
        default=None,
        help="stream N tokens, then close the connection mid-response, no [DONE] (non-streamed: half a body)",
    )
    f.add_argument(
        "--exit-after-requests",
        type=int,
        default=None,
        help="serve N generation requests, then exit at once (os._exit(1), like a crash)",
    )
    f.add_argument("--slow-start", type=float, default=0.0, metavar="S",
                   help="/health and /v1/models answer 503 for the first S seconds")  # fmt: skip
    return p


def _parse_loras(specs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for spec in specs:
        name, _, path = spec.partition("=")
        if not name:
            raise ConfigError(f"--lora {spec!r}: the adapter needs a name")
        out[name] = path or f"/sim/loras/{name}"
    return out


def config_from_args(ns: argparse.Namespace) -> SimConfig:
    return SimConfig(
        served_model_name=ns.served_model_name, model=ns.model, loras=_parse_loras(ns.lora),
        max_loras=ns.max_loras, max_num_seqs=ns.max_num_seqs, max_num_batched_tokens=ns.max_num_batched_tokens,
        num_gpu_blocks=ns.num_gpu_blocks,
        block_size=ns.block_size, max_model_len=ns.max_model_len, prefill_ms_per_token=ns.prefill_ms_per_token,
        decode_ms_per_token=ns.decode_ms_per_token, decode_batch_factor=ns.decode_batch_factor,
        lora_load_ms=ns.lora_load_ms, embedding_dim=ns.embedding_dim, api_key=ns.api_key,
        allow_runtime_lora=ns.allow_runtime_lora, seed=ns.seed, host=ns.host, port=ns.port,
        fail_rate=ns.fail_rate, fail_status=ns.fail_status, stall_after_tokens=ns.stall_after_tokens,
        drop_after_tokens=ns.drop_after_tokens, exit_after_requests=ns.exit_after_requests,
        slow_start_s=ns.slow_start,
    )  # fmt: skip


class _Server(uvicorn.Server):
    """uvicorn server that leaves signal handling to `serve_all` (one handler for K servers)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class _QuietUnfinished(logging.Filter):
    """`--drop-after-tokens` ends responses unfinished on purpose; uvicorn would log each one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "without completing response" not in record.getMessage()


def listen(host: str, port: int) -> socket.socket:
    """Bind the listening socket up front, so a busy port is a clear error before anything starts."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


async def serve_all(configs: list[SimConfig], sockets: list[socket.socket]) -> None:
    servers = [
        _Server(uvicorn.Config(create_sim_app(c), log_level="warning", access_log=False, lifespan="on",
                               timeout_graceful_shutdown=1))
        for c in configs
    ]  # fmt: skip
    loop = asyncio.get_running_loop()

    def stop() -> None:
        for s in servers:
            s.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop)
    tasks = [asyncio.create_task(s.serve(sockets=[sock])) for s, sock in zip(servers, sockets, strict=True)]
    while not all(s.started for s in servers):
        if any(t.done() for t in tasks):
            stop()
            break
        await asyncio.sleep(0.01)
    else:
        for c, sock in zip(configs, sockets, strict=True):
            host, port = sock.getsockname()[:2]
            print(f"worker.sim: serving {c.served_model_name!r} on http://{host}:{port}", flush=True)
    await asyncio.gather(*tasks)


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    sockets: list[socket.socket] = []
    try:
        base = config_from_args(ns)
        if ns.count < 1:
            raise ConfigError(f"--count must be >= 1, got {ns.count}")
        first = ns.port_base if ns.port_base is not None else ns.port
        if ns.count > 1 and first == 0:
            raise ConfigError("--count > 1 needs --port-base (or --port) > 0")
        configs = [base.replace(port=first + i) for i in range(ns.count)] if ns.count > 1 else [
            base.replace(port=first)]  # fmt: skip
        for c in configs:
            sockets.append(listen(c.host, c.port))
    except ConfigError as exc:
        for sock in sockets:
            sock.close()
        print(f"worker.sim: {exc}", file=sys.stderr)
        return 2
    logging.getLogger("uvicorn.error").addFilter(_QuietUnfinished())
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(serve_all(configs, sockets))
    except KeyboardInterrupt:
        pass
    return 0


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory
