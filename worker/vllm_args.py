"""Worker options -> the vLLM server's command line and environment (pure functions, no I/O)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

Engine = Literal["cpu", "gpu"]

# Settings measured on 2-core CPU machines (see the project's machine notes); applied only when unset.
CPU_ENV_DEFAULTS: dict[str, str] = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
}
CPU_MODULE = "vllm.entrypoints.openai.api_server"
KV_EVENTS_PORT = 5557
KV_REPLAY_PORT = 5558


@dataclass(frozen=True)
class WorkerOptions:
    """Everything the launcher needs to start one vLLM server for one model and its adapters."""

    model: str
    served_model_names: tuple[str, ...] = ()
    loras: tuple[tuple[str, str], ...] = ()
    host: str = "0.0.0.0"
    port: int = 8000
    api_key: str | None = None
    max_model_len: int | None = None
    dtype: str | None = None
    max_lora_rank: int | None = None
    max_loras: int | None = None
    runtime_lora: bool = False
    # KV cache events (ZMQ PUB on kv_events_port, replay ROUTER on kv_replay_port), with prefix caching, which
    # they report on; on by default for KV-aware routing
    kv_events: bool = True
    kv_events_port: int = KV_EVENTS_PORT
    kv_replay_port: int = KV_REPLAY_PORT
    prompt_tokens_details: bool = True  # usage.prompt_tokens_details.cached_tokens: the prefix cache's hits
    extra_args: tuple[str, ...] = field(default_factory=tuple)


def parse_lora(spec: str) -> tuple[str, str]:
    """'name=path' -> (name, path); raises ValueError naming the bad spec."""
    name, sep, path = spec.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise ValueError(f"--lora expects NAME=PATH, got {spec!r}")
    return name.strip(), path.strip()


def kv_events_config(events_port: int, replay_port: int) -> str:
    """vLLM's --kv-events-config: events published on every interface, as a pod's peers must reach them."""
    return json.dumps(
        {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": f"tcp://*:{events_port}",
            "replay_endpoint": f"tcp://*:{replay_port}",
        }
    )


def sets_flag(args: Sequence[str], *flags: str) -> bool:
    """Whether args set any of flags, as `--flag`, `--flag=value` or vLLM's underscore spelling."""
    names = {arg.split("=", 1)[0].replace("_", "-") for arg in args if arg.startswith("--")}
    return any(flag in names for flag in flags)


def _kv_and_usage_args(opts: WorkerOptions) -> list[str]:
    """The KV-event and prompt-token flags the options ask for, except those the user's extra args decide."""
    extra = opts.extra_args
    argv: list[str] = []
    # A user who turned prefix caching off gets no events either: they describe the prefix cache.
    caching_off = sets_flag(extra, "--no-enable-prefix-caching")
    if opts.kv_events and not caching_off:
        if not sets_flag(extra, "--enable-prefix-caching"):
            argv.append("--enable-prefix-caching")
        if not sets_flag(extra, "--kv-events-config"):
            argv += ["--kv-events-config", kv_events_config(opts.kv_events_port, opts.kv_replay_port)]
    details = ("--enable-prompt-tokens-details", "--no-enable-prompt-tokens-details")
    if opts.prompt_tokens_details and not sets_flag(extra, *details):
        argv.append("--enable-prompt-tokens-details")
    return argv


def build_vllm_argv(opts: WorkerOptions, engine: Engine, python: str) -> list[str]:
    """The vLLM OpenAI server command for opts.

    The CPU wheel's `vllm` console script is broken (it looks up the distribution "vllm"), so on the CPU
    build the server module is run directly; GPU images use the documented `vllm serve`.
    """
    if not opts.model:
        raise ValueError("a model (path or Hugging Face id) is required")
    if opts.port <= 0 or opts.port > 65535:
        raise ValueError(f"port must be 1..65535, got {opts.port}")
    names = [n for n in opts.served_model_names if n]
    lora_names = [name for name, _ in opts.loras]
    clash = set(names) & set(lora_names)
    if clash:
        raise ValueError(f"adapter names must differ from served model names: {sorted(clash)}")
    if len(set(lora_names)) != len(lora_names):
        raise ValueError(f"duplicate adapter names: {lora_names}")
    if opts.kv_events:
        for name, port in (("KV events port", opts.kv_events_port), ("KV replay port", opts.kv_replay_port)):
            if port <= 0 or port > 65535:
                raise ValueError(f"{name} must be 1..65535, got {port}")
        if len({opts.port, opts.kv_events_port, opts.kv_replay_port}) != 3:
            raise ValueError(
                f"the HTTP port ({opts.port}), KV events port ({opts.kv_events_port}) and KV replay port "
                f"({opts.kv_replay_port}) must differ"
            )

    argv = [python, "-m", CPU_MODULE, "--model", opts.model] if engine == "cpu" else ["vllm", "serve", opts.model]
    if names:
        argv += ["--served-model-name", *names]
    argv += ["--host", opts.host, "--port", str(opts.port)]
    if opts.max_model_len is not None:
        argv += ["--max-model-len", str(opts.max_model_len)]
    dtype = opts.dtype or ("bfloat16" if engine == "cpu" else None)
    if dtype:
        argv += ["--dtype", dtype]
    if opts.loras or opts.runtime_lora:
        argv.append("--enable-lora")
        if opts.max_lora_rank is not None:
            argv += ["--max-lora-rank", str(opts.max_lora_rank)]
        if opts.max_loras is not None:
            argv += ["--max-loras", str(opts.max_loras)]
        if opts.loras:
            argv += ["--lora-modules", *(f"{name}={path}" for name, path in opts.loras)]
    argv += _kv_and_usage_args(opts)
    argv += list(opts.extra_args)
    return argv


def build_vllm_env(base: Mapping[str, str], opts: WorkerOptions, engine: Engine) -> dict[str, str]:
    """The child's environment: base plus CPU defaults (never overriding what the user set).

    The API key goes here as VLLM_API_KEY rather than on the command line, where `ps` and vLLM's own log of
    its arguments would show it.
    """
    env = dict(base)
    if opts.api_key:
        env["VLLM_API_KEY"] = opts.api_key
    if engine == "cpu":
        for key, value in CPU_ENV_DEFAULTS.items():
            env.setdefault(key, value)
    if opts.runtime_lora:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"
    return env


def health_url(opts: WorkerOptions) -> str:
    """Where the launcher polls /health: a wildcard bind address is reached through loopback."""
    host = opts.host
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{opts.port}/health"
