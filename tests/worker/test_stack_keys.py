"""A stack whose gateway takes client keys and whose workers require keys of their own (`api_key_env`), run as
`switchyard up --sim --stack FILE`, driven by the streaming client code a user would write with requests."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from worker.procs import free_port_block

FAST = ["--prefill-ms-per-token", "0.01", "--decode-ms-per-token", "1"]


@dataclass
class KeyedStack:
    url: str
    chat_worker: str
    client_key: str
    worker_keys: list[str]
    log_dir: Path
    process: subprocess.Popen[str]
    startup_output: str


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyedStack]:
    tmp = tmp_path_factory.mktemp("keyed")
    port = free_port_block(3)
    env = {
        **os.environ,
        "SY_TEST_CLIENT_KEY": "sk-client-" + secrets.token_hex(12),
        "SY_TEST_CHAT_KEY": "sk-chat-worker-" + secrets.token_hex(12),
        "SY_TEST_EMBED_KEY": "sk-embed-worker-" + secrets.token_hex(12),
    }
    stack_file = tmp / "stack.yaml"
    stack_file.write_text(
        yaml.safe_dump(
            {
                "gateway": {
                    "port": port,
                    "settings": {
                        "model_refresh_interval": 0.5,
                        "auth": {"keys": [{"name": "team-a", "key_env": "SY_TEST_CLIENT_KEY"}]},
                    },
                },
                "workers": [
                    {"name": "chat", "model": "chat", "loras": {"chat-lora": "/l"}, "port": port + 1,
                     "api_key_env": "SY_TEST_CHAT_KEY", "sim_args": FAST},
                    {"name": "embed", "model": "embed", "port": port + 2,
                     "api_key_env": "SY_TEST_EMBED_KEY", "sim_args": FAST},
                ],
            }
        )
    )  # fmt: skip
    log_dir = tmp / "logs"
    argv = [sys.executable, "-m", "worker.stack", "--sim", "--stack", str(stack_file), "--log-dir", str(log_dir)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        while not lines or not lines[-1].startswith("Switchyard is up"):  # the banner: everything is ready
            line = proc.stdout.readline()
            assert line, f"switchyard up exited early: {''.join(lines)}"
            lines.append(line)
        yield KeyedStack(
            url,
            f"http://127.0.0.1:{port + 1}",
            env["SY_TEST_CLIENT_KEY"],
            [env["SY_TEST_CHAT_KEY"], env["SY_TEST_EMBED_KEY"]],
            log_dir,
            proc,
            "".join(lines),
        )
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)


def stream_chat(url: str, key: str, model: str, prompt: str) -> tuple[str, str | None]:
    """What a user writes with requests: POST with stream=True, read the SSE `data:` lines until [DONE]."""
    response = requests.post(
        f"{url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 12, "stream": True},
        stream=True,
        timeout=30,
    )
    response.raise_for_status()
    text, finish = "", None
    for line in response.iter_lines(decode_unicode=True):
        if not line or not line.startswith("data: "):
            continue
        data = line.removeprefix("data: ")
        if data == "[DONE]":
            break
        chunk: dict[str, Any] = json.loads(data)
        for choice in chunk["choices"]:
            text += choice["delta"].get("content") or ""
            finish = choice.get("finish_reason") or finish
    return text, finish


def test_streams_answer_through_the_gateway_with_the_client_key(keyed: KeyedStack) -> None:
    for model in ("chat", "chat-lora"):
        text, finish = stream_chat(keyed.url, keyed.client_key, model, "Say hello")
        assert text.strip(), model
        assert finish in ("stop", "length")
    embedding = requests.post(
        f"{keyed.url}/v1/embeddings",
        headers={"Authorization": f"Bearer {keyed.client_key}"},
        json={"model": "embed", "input": "hello"},
        timeout=30,
    )
    assert embedding.status_code == 200
    assert embedding.json()["data"][0]["embedding"]


@pytest.mark.parametrize("header", [{"Authorization": "Bearer sk-wrong"}, {}], ids=["wrong key", "no key"])
def test_a_wrong_or_missing_client_key_is_401(keyed: KeyedStack, header: dict[str, str]) -> None:
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    response = requests.post(f"{keyed.url}/v1/chat/completions", headers=header, json=body, timeout=30)
    assert response.status_code == 401
    assert response.json()["error"]["message"]


def test_the_workers_really_require_their_keys(keyed: KeyedStack) -> None:
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    url = f"{keyed.chat_worker}/v1/chat/completions"
    assert requests.post(url, json=body, timeout=30).status_code == 401
    client = {"Authorization": f"Bearer {keyed.client_key}"}  # the gateway's client key is not the worker's
    assert requests.post(url, json=body, headers=client, timeout=30).status_code == 401
    worker = {"Authorization": f"Bearer {keyed.worker_keys[0]}"}
    assert requests.post(url, json=body, headers=worker, timeout=30).status_code == 200


def test_no_key_appears_in_the_generated_config_the_logs_or_the_output(keyed: KeyedStack) -> None:
    config = yaml.safe_load((keyed.log_dir / "gateway.yaml").read_text())
    assert [b.get("api_key_env") for b in config["backends"]] == ["SY_TEST_CHAT_KEY", "SY_TEST_EMBED_KEY"]
    keyed.process.send_signal(signal.SIGINT)
    assert keyed.process.stdout is not None
    rest = keyed.process.stdout.read()  # not communicate(): it would skip what readline() buffered
    assert keyed.process.wait(timeout=60) == 0
    output = keyed.startup_output + rest
    assert "Switchyard is up" in output
    assert '-H "Authorization: Bearer $SY_TEST_CLIENT_KEY"' in output  # the banner names the variable
    files = sorted(p for p in keyed.log_dir.iterdir() if p.is_file())
    assert {p.name for p in files} >= {"gateway.yaml", "gateway.log", "chat.log", "embed.log"}
    for key in [*keyed.worker_keys, keyed.client_key]:
        assert key not in output
        for path in files:
            assert key not in path.read_text(errors="replace"), path.name


def test_an_unset_key_variable_stops_the_stack_before_it_starts(tmp_path: Path) -> None:
    port = free_port_block(2)
    stack_file = tmp_path / "stack.yaml"
    worker = {"name": "w", "model": "m", "port": port + 1, "api_key_env": "SY_TEST_UNSET_KEY"}
    stack_file.write_text(yaml.safe_dump({"gateway": {"port": port}, "workers": [worker]}))
    env = {k: v for k, v in os.environ.items() if k != "SY_TEST_UNSET_KEY"}
    argv = [sys.executable, "-m", "worker.stack", "--sim", "--stack", str(stack_file), "--log-dir", str(tmp_path)]
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert result.stderr == "switchyard up: worker w: api_key_env names SY_TEST_UNSET_KEY, which is not set here\n"
    assert not (tmp_path / "gateway.yaml").exists()
