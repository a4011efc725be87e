"""The pure vLLM command-line and environment builders."""

from __future__ import annotations

import pytest

from worker.vllm_args import (
    CPU_MODULE,
    WorkerOptions,
    build_vllm_argv,
    build_vllm_env,
    health_url,
    parse_lora,
)


def test_cpu_build_runs_the_server_module_with_bf16() -> None:
    opts = WorkerOptions(model="/m/chat", served_model_names=("chat",), port=8001, host="127.0.0.1")
    assert build_vllm_argv(opts, "cpu", "/py") == [
        "/py", "-m", CPU_MODULE, "--model", "/m/chat", "--served-model-name", "chat",
        "--host", "127.0.0.1", "--port", "8001", "--dtype", "bfloat16",
    ]  # fmt: skip


def test_gpu_build_uses_vllm_serve_and_no_default_dtype() -> None:
    opts = WorkerOptions(model="org/model")
    assert build_vllm_argv(opts, "gpu", "/py") == ["vllm", "serve", "org/model", "--host", "0.0.0.0", "--port", "8000"]


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
