"""Command line of the simulator: `python -m worker.sim` / `switchyard sim`.

`--count K --port-base P` runs K independent simulated servers (ports P..P+K-1) on one event loop
in one process; each has its own engine, metrics registry, adapters and KV event sockets (server i adds
2*i to the tcp ports of --kv-events-config, so the usual PUB/replay pair N, N+1 never collides).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator

import uvicorn

from worker.sim.config import ConfigError, SimConfig
from worker.sim.kv_events import KVEventsSettings, parse_kv_events_config
from worker.sim.server import DEV_MODE_ENV, RUNTIME_LORA_ENV, SimApp, create_sim_app

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
    a("--api-key", default=os.environ.get("VLLM_API_KEY"),
      help="require `Authorization: Bearer KEY` on /v1/* (401 otherwise; default: env VLLM_API_KEY)")  # fmt: skip
    a("--allow-runtime-lora", action="store_true",
      help=f"enable /v1/load_lora_adapter and /v1/unload_lora_adapter (also: env {RUNTIME_LORA_ENV}=1)")  # fmt: skip
    a("--seed", type=int, default=d.seed, help="seed for unseeded sampling and fault draws")
    a("--host", default=d.host, help="address to bind (0.0.0.0 in a container)")
    a("--port", type=int, default=d.port, help="port to bind (0: any free port; printed at startup)")
    a("--count", type=int, default=1, help="run this many independent servers in this process")
    a("--port-base", type=int, default=None, help="first port with --count; unset: --port")
    k = p.add_argument_group("prefix caching and KV cache events (as vLLM)")
    k.add_argument("--enable-prefix-caching", action="store_true",
                   help="accepted for vLLM compatibility: the simulator always caches prefixes")  # fmt: skip
    k.add_argument(
        "--kv-events-config",
        default=None,
        metavar="JSON",
        help='vLLM\'s KVEventsConfig as JSON, e.g. \'{"enable_kv_cache_events": true, "publisher": "zmq", '
        '"endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5558"}\' (keys: enable_kv_cache_events, '
        "publisher, endpoint, replay_endpoint, buffer_steps, hwm, max_queue_size, topic); BlockStored, "
        "BlockRemoved and AllBlocksCleared batches, one per engine step, on a ZMQ PUB socket; "
        "tcp://*:0 takes a free port (see GET /kv_event_sources); with --count, server i adds 2*i to tcp ports",
    )
    k.add_argument("--kv-hash-seed", type=int, default=d.kv_hash_seed,
                   help="seed of the block hash chain: other seeds give the same tokens other hashes")  # fmt: skip
    k.add_argument("--enable-prompt-tokens-details", action="store_true",
                   help="usage.prompt_tokens_details.cached_tokens (prefix-cache hits) in answers")  # fmt: skip
    k.add_argument("--server-dev-mode", action="store_true",
                   help=f"enable POST /reset_prefix_cache (also: env {DEV_MODE_ENV}=1)")  # fmt: skip
    k.add_argument("--positional-output", action="store_true",
                   help="answer token i is the number i (4 characters, right-aligned), i counting the answer tokens "
                   "the prompt already ends with: a continued answer shows duplicated or missing tokens")  # fmt: skip
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
    f.add_argument(
        "--exit-after-tokens",
        type=int,
        default=None,
        help="when a request has streamed N tokens and the next is due, the process exits at once (os._exit(1), "
        "like kill -9; all --count servers go); non-streamed: when its token N+1 is generated",
    )
    f.add_argument(
        "--error-after-tokens",
        type=int,
        default=None,
        help="stream N tokens, then vLLM's mid-stream error event and [DONE] (non-streamed: vLLM's 500 body); "
        "a request of at most N tokens is not affected",
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
        exit_after_tokens=ns.exit_after_tokens, error_after_tokens=ns.error_after_tokens,
        slow_start_s=ns.slow_start, kv_hash_seed=ns.kv_hash_seed,
        kv_events=parse_kv_events_config(ns.kv_events_config) if ns.kv_events_config else KVEventsSettings(),
        enable_prompt_tokens_details=ns.enable_prompt_tokens_details, server_dev_mode=ns.server_dev_mode,
        positional_output=ns.positional_output,
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


def server_configs(base: SimConfig, count: int, first_port: int) -> list[SimConfig]:
    """One config per server of `--count`: consecutive HTTP ports, KV event tcp ports 2 apart."""
    return [base.replace(port=first_port + i, kv_events=base.kv_events.for_server(i)) for i in range(count)]


async def serve_all(apps: list[SimApp], sockets: list[socket.socket]) -> None:
    servers = [
        _Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                               timeout_graceful_shutdown=1))
        for app in apps
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
        for app, sock in zip(apps, sockets, strict=True):
            host, port = sock.getsockname()[:2]
            print(f"worker.sim: serving {app.config.served_model_name!r} on http://{host}:{port}", flush=True)
    await asyncio.gather(*tasks)


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    sockets: list[socket.socket] = []
    apps: list[SimApp] = []
    try:
        base = config_from_args(ns)
        if ns.count < 1:
            raise ConfigError(f"--count must be >= 1, got {ns.count}")
        first = ns.port_base if ns.port_base is not None else ns.port
        if ns.count > 1 and first == 0:
            raise ConfigError("--count > 1 needs --port-base (or --port) > 0")
        for c in server_configs(base, ns.count, first):
            sockets.append(listen(c.host, c.port))
            apps.append(create_sim_app(c))
            if apps[-1].state.publisher is not None:
                apps[-1].state.publisher.open()  # bind now: a busy event port is a clear error too
    except ConfigError as exc:
        for sock in sockets:
            sock.close()
        for app in apps:
            if app.state.publisher is not None:
                asyncio.run(app.state.publisher.close())
        print(f"worker.sim: {exc}", file=sys.stderr)
        return 2
    logging.getLogger("uvicorn.error").addFilter(_QuietUnfinished())
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(serve_all(apps, sockets))
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
