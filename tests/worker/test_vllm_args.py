"""The pure vLLM command-line and environment builders."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from worker.vllm_args import (
    CPU_MODULE,
    WorkerOptions,
    build_vllm_argv,
    build_vllm_env,
    health_url,
    parse_lora,
)

# The fixed contract of the upcoming KV-aware routing: these exact flags, by default.
KV_CONFIG = '{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5558"}'
NULL_PUBLISHER = '{"publisher": "null"}'
DEFAULT_KV_FLAGS = ["--enable-prefix-caching", "--kv-events-config", KV_CONFIG, "--enable-prompt-tokens-details"]


def test_cpu_build_runs_the_server_module_with_bf16() -> None:
    opts = WorkerOptions(model="/m/chat", served_model_names=("chat",), port=8001, host="127.0.0.1")
    assert build_vllm_argv(opts, "cpu", "/py") == [
        "/py", "-m", CPU_MODULE, "--model", "/m/chat", "--served-model-name", "chat",
        "--host", "127.0.0.1", "--port", "8001", "--dtype", "bfloat16", *DEFAULT_KV_FLAGS,
    ]  # fmt: skip


def test_gpu_build_uses_vllm_serve_and_no_default_dtype() -> None:
    opts = WorkerOptions(model="org/model")
    assert build_vllm_argv(opts, "gpu", "/py") == [
        "vllm", "serve", "org/model", "--host", "0.0.0.0", "--port", "8000", *DEFAULT_KV_FLAGS,
    ]  # fmt: skip


def test_loras_enable_lora_and_are_listed_in_order() -> None:
    opts = WorkerOptions(
        model="/m", loras=(("a", "/l/a"), ("b", "/l/b")), max_lora_rank=8, max_loras=2, api_key="k", max_model_len=2048
    )
    argv = build_vllm_argv(opts, "cpu", "py")
    assert argv[argv.index("--lora-modules") + 1 :][:2] == ["a=/l/a", "b=/l/b"]
    assert "--enable-lora" in argv
    assert argv[argv.index("--max-lora-rank") + 1] == "8"
    assert argv[argv.index("--max-loras") + 1] == "2"
    assert argv[argv.index("--max-model-len") + 1] == "2048"


def test_the_api_key_goes_to_the_environment_never_the_command_line() -> None:
    opts = WorkerOptions(model="/m", api_key="sk-secret")
    for engine in ("cpu", "gpu"):
        assert not [arg for arg in build_vllm_argv(opts, engine, "py") if "sk-secret" in arg or arg == "--api-key"]
        assert build_vllm_env({}, opts, engine)["VLLM_API_KEY"] == "sk-secret"
    assert "VLLM_API_KEY" not in build_vllm_env({}, WorkerOptions(model="/m"), "cpu")


def test_runtime_lora_enables_lora_without_modules_and_sets_the_env() -> None:
    opts = WorkerOptions(model="/m", runtime_lora=True)
    argv = build_vllm_argv(opts, "cpu", "py")
    assert "--enable-lora" in argv
    assert "--lora-modules" not in argv
    assert build_vllm_env({}, opts, "cpu")["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "1"


def test_extra_args_come_last_and_unchanged() -> None:
    opts = WorkerOptions(model="/m", extra_args=("--max-num-seqs", "4", "--enforce-eager"))
    assert build_vllm_argv(opts, "gpu", "py")[-3:] == ["--max-num-seqs", "4", "--enforce-eager"]


def test_explicit_dtype_wins() -> None:
    argv = build_vllm_argv(WorkerOptions(model="/m", dtype="float32"), "cpu", "py")
    assert argv[argv.index("--dtype") + 1] == "float32"


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        (WorkerOptions(model=""), "model"),
        (WorkerOptions(model="/m", port=0), "port"),
        (WorkerOptions(model="/m", port=70000), "port"),
        (WorkerOptions(model="/m", served_model_names=("x",), loras=(("x", "/p"),)), "differ"),
        (WorkerOptions(model="/m", loras=(("x", "/p"), ("x", "/q"))), "duplicate"),
    ],
)
def test_bad_options_are_rejected_with_a_clear_message(opts: WorkerOptions, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_vllm_argv(opts, "cpu", "py")


def test_cpu_env_defaults_never_override_the_user() -> None:
    env = build_vllm_env({"OMP_NUM_THREADS": "2", "PATH": "/bin"}, WorkerOptions(model="/m"), "cpu")
    assert env["OMP_NUM_THREADS"] == "2"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["PATH"] == "/bin"


def test_gpu_env_is_left_alone() -> None:
    assert build_vllm_env({"A": "b"}, WorkerOptions(model="/m"), "gpu") == {"A": "b"}


@pytest.mark.parametrize(("spec", "expected"), [("a=/p", ("a", "/p")), (" a = /p=q ", ("a", "/p=q"))])
def test_parse_lora(spec: str, expected: tuple[str, str]) -> None:
    assert parse_lora(spec) == expected


@pytest.mark.parametrize("spec", ["a", "=p", "a=", ""])
def test_parse_lora_rejects_bad_specs(spec: str) -> None:
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse_lora(spec)


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("0.0.0.0", "http://127.0.0.1:9/health"),
        ("127.0.0.2", "http://127.0.0.2:9/health"),
        ("::1", "http://[::1]:9/health"),
    ],
)
def test_health_url(host: str, url: str) -> None:
    assert health_url(WorkerOptions(model="/m", host=host, port=9)) == url


def test_kv_events_on_other_ports_and_each_part_off() -> None:
    argv = build_vllm_argv(WorkerOptions(model="/m", kv_events_port=21557, kv_replay_port=21558), "cpu", "py")
    config = json.loads(argv[argv.index("--kv-events-config") + 1])
    assert config == {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": "tcp://*:21557",
        "replay_endpoint": "tcp://*:21558",
    }
    off = build_vllm_argv(WorkerOptions(model="/m", kv_events=False), "cpu", "py")
    assert not {"--enable-prefix-caching", "--kv-events-config"} & set(off)
    assert "--enable-prompt-tokens-details" in off
    bare = build_vllm_argv(WorkerOptions(model="/m", kv_events=False, prompt_tokens_details=False), "cpu", "py")
    assert not [arg for arg in bare if "prefix" in arg or "kv-events" in arg or "tokens-details" in arg]


@pytest.mark.parametrize(
    ("extra", "added"),
    [
        (["--enable-prefix-caching"], ["--kv-events-config", KV_CONFIG, "--enable-prompt-tokens-details"]),
        (["--enable_prefix_caching"], ["--kv-events-config", KV_CONFIG, "--enable-prompt-tokens-details"]),
        (["--kv-events-config", NULL_PUBLISHER], ["--enable-prefix-caching", "--enable-prompt-tokens-details"]),
        (["--kv-events-config={}"], ["--enable-prefix-caching", "--enable-prompt-tokens-details"]),
        # prefix caching turned off: no events either, they describe the prefix cache
        (["--no-enable-prefix-caching"], ["--enable-prompt-tokens-details"]),
        (["--no-enable-prompt-tokens-details"], ["--enable-prefix-caching", "--kv-events-config", KV_CONFIG]),
        (["--enable-prompt-tokens-details"], ["--enable-prefix-caching", "--kv-events-config", KV_CONFIG]),
    ],
)
def test_what_the_users_extra_args_set_is_left_to_them(extra: list[str], added: list[str]) -> None:
    plain = build_vllm_argv(WorkerOptions(model="/m", kv_events=False, prompt_tokens_details=False), "gpu", "py")
    argv = build_vllm_argv(WorkerOptions(model="/m", extra_args=tuple(extra)), "gpu", "py")
    assert argv == [*plain, *added, *extra]


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        (WorkerOptions(model="/m", kv_events_port=0), "KV events port"),
        (WorkerOptions(model="/m", kv_replay_port=70000), "KV replay port"),
        (WorkerOptions(model="/m", kv_events_port=8000), "must differ"),
        (WorkerOptions(model="/m", kv_events_port=6000, kv_replay_port=6000), "must differ"),
    ],
)
def test_bad_kv_ports_are_rejected(opts: WorkerOptions, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_vllm_argv(opts, "cpu", "py")
    build_vllm_argv(replace(opts, kv_events=False), "cpu", "py")  # ports unused when events are off
