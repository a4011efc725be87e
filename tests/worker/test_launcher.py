"""The launcher as a process: options from argv and env, signal forwarding, exit codes, startup timeout.

The vLLM child is replaced here by a small stand-in interpreter (given as --vllm-python) that serves /health over
a real socket and behaves as told; the real vLLM runs under the launcher in the e2e suite.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.servers import wait_until
from worker.launcher import parse_settings
from worker.procs import free_port_block, http_ok

STAND_IN = r"""
import http.server, os, signal, sys, threading, time
argv = sys.argv[1:]
port = int(argv[argv.index("--port") + 1])
mode = os.environ.get("STAND_IN_MODE", "serve")
with open(os.environ["STAND_IN_RECORD"], "w") as f:
    f.write(" ".join(argv) + "\n" + os.environ.get("OMP_NUM_THREADS", "") + "\n")
    f.write(os.environ.get("VLLM_API_KEY", "") + "\n")
if mode == "crash":
    sys.exit(3)
signal.signal(signal.SIGTERM, lambda *a: os._exit(7))
if mode == "hang":
    time.sleep(600)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"""


@pytest.fixture
def stand_in(tmp_path: Path) -> Path:
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nshift 2\nexec {sys.executable} {script} "$@"\n')  # drop "-m module"
    python.chmod(0o755)
    return python


def _launch(
    stand_in: Path, tmp_path: Path, mode: str, *extra: str, port: int | None = None
) -> tuple[subprocess.Popen[str], int, Path]:
    port = port or free_port_block(1)
    record = tmp_path / "record.txt"
    env = {**os.environ, "STAND_IN_MODE": mode, "STAND_IN_RECORD": str(record)}
    env.pop("OMP_NUM_THREADS", None)
    argv = [sys.executable, "-m", "worker", "--model", "/m", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--vllm-python", str(stand_in), "--engine", "cpu", *extra]
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    return proc, port, record


def test_forwards_sigterm_and_exits_with_the_childs_code(stand_in: Path, tmp_path: Path) -> None:
    key = "sk-launcher-secret"
    proc, port, record = _launch(
        stand_in, tmp_path, "serve", "--lora", "a=/l/a", "--api-key", key, "--", "--max-num-seqs", "3"
    )
    wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/health"), 20, what="stand-in health")
    argv_line, omp, child_key = record.read_text().splitlines()
    assert "--lora-modules a=/l/a" in argv_line
    assert "--enable-prefix-caching --kv-events-config" in argv_line  # on by default
    assert argv_line.endswith("--max-num-seqs 3")
    assert omp == "1"  # CPU defaults applied to the child
    assert child_key == key  # vLLM reads VLLM_API_KEY
    assert key not in argv_line
    time.sleep(1.5)  # the launcher polls /health once a second; let it log that vLLM is healthy
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 7
    _, err = proc.communicate()
    assert "vLLM healthy after" in err
    assert key not in err  # not in the launcher's log of the command it ran
    assert not http_ok(f"http://127.0.0.1:{port}/health")


def test_child_dying_during_startup_is_one_clear_line_and_its_code(stand_in: Path, tmp_path: Path) -> None:
    proc, _, _ = _launch(stand_in, tmp_path, "crash")
    assert proc.wait(timeout=20) == 3
    err = proc.communicate()[1]
    assert "vLLM exited with code 3 before becoming healthy" in err


def test_startup_timeout_stops_the_child(stand_in: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    proc, _, _ = _launch(stand_in, tmp_path, "hang", "--startup-timeout", "2")
    assert proc.wait(timeout=30) == 1
    assert "not healthy" in proc.communicate()[1]
    assert time.monotonic() - started < 25


def test_bad_option_is_an_error_before_anything_starts(stand_in: Path, tmp_path: Path) -> None:
    proc, _, record = _launch(stand_in, tmp_path, "serve", "--lora", "oops")
    assert proc.wait(timeout=20) == 2
    assert "NAME=PATH" in proc.communicate()[1]
    assert not record.exists()


def test_every_option_comes_from_the_environment() -> None:
    env = {
        "SWITCHYARD_WORKER_MODEL": "/models/chat",
        "SWITCHYARD_WORKER_SERVED_MODEL_NAME": "chat, chat-alias",
        "SWITCHYARD_WORKER_LORA": "a=/l/a,b=/l/b",
        "SWITCHYARD_WORKER_HOST": "127.0.0.1",
        "SWITCHYARD_WORKER_PORT": "9001",
        "SWITCHYARD_WORKER_API_KEY": "k",
        "SWITCHYARD_WORKER_MAX_MODEL_LEN": "1024",
        "SWITCHYARD_WORKER_DTYPE": "float32",
        "SWITCHYARD_WORKER_MAX_LORA_RANK": "8",
        "SWITCHYARD_WORKER_MAX_LORAS": "2",
        "SWITCHYARD_WORKER_RUNTIME_LORA": "true",
        "SWITCHYARD_WORKER_ENGINE": "gpu",
        "SWITCHYARD_WORKER_VLLM_PYTHON": "/opt/py",
        "SWITCHYARD_WORKER_STARTUP_TIMEOUT": "30",
        "SWITCHYARD_WORKER_EXTRA_ARGS": "--max-num-seqs 4",
        "SWITCHYARD_WORKER_KV_EVENTS": "off",
        "SWITCHYARD_WORKER_KV_EVENTS_PORT": "6557",
        "SWITCHYARD_WORKER_KV_REPLAY_PORT": "6558",
        "SWITCHYARD_WORKER_PROMPT_TOKENS_DETAILS": "OFF",
    }
    s = parse_settings(["--", "--enforce-eager"], env)
    o = s.options
    assert (o.model, o.served_model_names, o.loras) == (
        "/models/chat",
        ("chat", "chat-alias"),
        (("a", "/l/a"), ("b", "/l/b")),
    )
    assert (o.host, o.port, o.api_key, o.max_model_len, o.dtype) == ("127.0.0.1", 9001, "k", 1024, "float32")
    assert (o.max_lora_rank, o.max_loras, o.runtime_lora) == (8, 2, True)
    assert (s.engine, s.python, s.startup_timeout) == ("gpu", "/opt/py", 30.0)
    assert o.extra_args == ("--max-num-seqs", "4", "--enforce-eager")
    assert (o.kv_events, o.kv_events_port, o.kv_replay_port, o.prompt_tokens_details) == (False, 6557, 6558, False)


def test_kv_events_and_prompt_token_details_are_on_by_default_on_5557_and_5558() -> None:
    o = parse_settings(["--model", "/m", "--engine", "cpu"], {}).options
    assert (o.kv_events, o.kv_events_port, o.kv_replay_port, o.prompt_tokens_details) == (True, 5557, 5558, True)
    argv = ["--model", "/m", "--engine", "gpu", "--kv-events", "on", "--kv-events-port", "7001"]
    o = parse_settings([*argv, "--kv-replay-port", "7002", "--prompt-tokens-details", "off"], {}).options
    assert (o.kv_events, o.kv_events_port, o.kv_replay_port, o.prompt_tokens_details) == (True, 7001, 7002, False)


def test_argv_wins_over_the_environment() -> None:
    env = {"SWITCHYARD_WORKER_MODEL": "/env", "SWITCHYARD_WORKER_PORT": "1", "SWITCHYARD_WORKER_LORA": "x=/x"}
    s = parse_settings(["--model", "/argv", "--port", "2", "--lora", "y=/y", "--engine", "cpu"], env)
    assert (s.options.model, s.options.port, s.options.loras) == ("/argv", 2, (("y", "/y"),))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "--model"),
        (["--model", "/m", "--port", "x"], "--port must be an integer"),
        (["--model", "/m", "--max-model-len", "big"], "--max-model-len"),
        (["--model", "/m", "--startup-timeout", "0"], "positive"),
        (["--model", "/m", "--port", "0"], "port"),
        (["--model", "/m", "--kv-events", "yes"], "--kv-events must be on or off"),
        (["--model", "/m", "--prompt-tokens-details", "1"], "--prompt-tokens-details must be on or off"),
        (["--model", "/m", "--kv-events-port", "x"], "--kv-events-port must be an integer"),
        (["--model", "/m", "--kv-replay-port", "0"], "KV replay port must be 1..65535"),
        (["--model", "/m", "--port", "5557"], "must differ"),
    ],
)
def test_bad_settings_name_the_option(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_settings([*argv, "--engine", "cpu"], {})


def test_vllm_does_not_outlive_a_killed_launcher(stand_in: Path, tmp_path: Path) -> None:
    proc, port, _ = _launch(stand_in, tmp_path, "serve")
    wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/health"), 20, what="stand-in health")
    proc.kill()  # SIGKILL: no chance to forward anything
    proc.wait(10)
    wait_until(lambda: not http_ok(f"http://127.0.0.1:{port}/health", timeout=0.5), 10, what="child gone")
