"""Helpers for the resilience tests: a gateway in a child process (so RSS, sockets and the event loop are
its own), SSE parsing, Prometheus samples and socket/RSS readings from /proc."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.servers import free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]

# TCP states in /proc/net/tcp (include/net/tcp_states.h)
ESTABLISHED = "01"
CLOSE_WAIT = "08"


@dataclass
class GatewayProcess:
    """`python -m gateway --config FILE` as a child process. With `probe=True` the same CLI runs through
    tests.resilience.probed_gateway, which adds GET /__probe (asyncio tasks and in-flight counts)."""

    config: dict[str, Any]
    probe: bool = False
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _config_file: str = ""
    _log: Any = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def __enter__(self) -> GatewayProcess:
        config = {"model_refresh_interval": 0.2, "log_level": "warning", "access_log": False, **self.config}
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
            yaml.safe_dump(config, handle)
            self._config_file = handle.name
        module = "tests.resilience.probed_gateway" if self.probe else "gateway"
        argv = ["--config", self._config_file, "--host", "127.0.0.1", "--port", str(self.port)]
        self._log = tempfile.TemporaryFile()  # a file, not a pipe: a chatty gateway must never block on it
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, *argv],
            cwd=ROOT,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )
        try:
            wait_until(lambda: self._up(), 30, what="gateway process to answer /ready")
        except AssertionError:
            self.__exit__()
            raise
        return self

    def _up(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"gateway exited with {self.process.returncode}: {self.log()[-2000:]}")
        return httpx.get(self.url + "/ready", timeout=2).status_code == 200

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        if self._config_file:
            Path(self._config_file).unlink(missing_ok=True)
        if self._log is not None:
            self._log.close()

    def log(self) -> str:
        self._log.seek(0)
        text: bytes = self._log.read()
        return text.decode(errors="replace")

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def probe_state(self) -> dict[str, Any]:
        state: dict[str, Any] = httpx.get(self.url + "/__probe", timeout=5).json()
        return state

    def metric(self, name: str, **labels: str) -> float:
        return metric_sum(httpx.get(self.url + "/metrics", timeout=5).text, name, **labels)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def metric_sum(text: str, name: str, **labels: str) -> float:
    """Sum of a sample over the label sets that carry all `labels` (Prometheus text format)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line[len(name)] not in "{ ":
            continue
        series, value = line.rsplit(" ", 1)
        if all(f'{key}="{wanted}"' in series for key, wanted in labels.items()):
            total += float(value)
    return total


def tcp_sockets(*, local_port: int | None = None, remote_port: int | None = None, states: tuple[str, ...]) -> int:
    """Loopback TCP sockets in this network namespace with the given ports and states (/proc/net/tcp{,6})."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            parts = line.split()
            local, remote, state = parts[1], parts[2], parts[3]
            if state not in states:
                continue
            if local_port is not None and int(local.rsplit(":", 1)[1], 16) != local_port:
                continue
            if remote_port is not None and int(remote.rsplit(":", 1)[1], 16) != remote_port:
                continue
            count += 1
    return count


def sse_payloads(raw: str) -> list[str]:
    """The `data:` payloads of an SSE body, in order."""
    payloads = []
    for event in raw.split("\n\n"):
        for line in event.splitlines():
            if line.startswith("data: "):
                payloads.append(line[len("data: ") :])
    return payloads


def is_error_event(payload: str) -> bool:
    try:
        data = json.loads(payload)
    except ValueError:
        return False
    return isinstance(data, dict) and isinstance(data.get("error"), dict) and bool(data["error"].get("message"))


def is_gateway_error_body(text: str) -> bool:
    """The OpenAI error shape the gateway answers with: {"error": {"message", "type", "param", "code"}}."""
    try:
        data = json.loads(text)
    except ValueError:
        return False
    error = data.get("error") if isinstance(data, dict) else None
    return isinstance(error, dict) and {"message", "type", "param", "code"} <= error.keys()


def iter_sse(response: httpx.Response) -> Iterator[str]:
    """SSE `data:` payloads as they arrive."""
    buffer = ""
    for text in response.iter_text():
        buffer += text
        while "\n\n" in buffer:
            event, buffer = buffer.split("\n\n", 1)
            for line in event.splitlines():
                if line.startswith("data: "):
                    yield line[len("data: ") :]


def positional(count: int) -> str:
    """The text of `count` answer tokens from a simulator run with --positional-output."""
    return "".join(f"{i:>4}" for i in range(count))


def assert_one_stream(raw: str, route: str, tokens: int, prompt: int, usage: bool) -> None:
    """A well-formed SSE body of `tokens` positional tokens (a simulator with --positional-output), as one
    uninterrupted backend would have sent it: one head (id, object, created, model), one role chunk, no token ids,
    exactly one finish_reason, the usage event when asked for (`prompt` tokens), and one [DONE]."""
    payloads = sse_payloads(raw)
    assert payloads[-1] == "[DONE]", raw[-300:]
    assert payloads.count("[DONE]") == 1, raw[-300:]
    assert not any(is_error_event(p) for p in payloads), raw[-300:]
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert len({(c["id"], c["object"], c["created"], c["model"]) for c in chunks}) == 1, "the stream's head changed"
    content = [c for c in chunks if c["choices"]]
    choices = [c["choices"][0] for c in content]
    if route == "/v1/chat/completions":
        assert [i for i, choice in enumerate(choices) if "role" in choice["delta"]] == [0], "not one role chunk"
        text = "".join(choice["delta"].get("content") or "" for choice in choices)
        assert content[0]["prompt_token_ids"] is None
    else:
        text = "".join(choice["text"] for choice in choices)
        assert all(choice["prompt_token_ids"] is None for choice in choices)
    assert text == positional(tokens)
    assert [choice["finish_reason"] for choice in choices if choice["finish_reason"]] == ["length"]
    assert choices[-1]["finish_reason"] == "length"
    assert all(choice.get("token_ids") is None for choice in choices), "token ids the client did not ask for"
    usages = [c for c in chunks if not c["choices"]]
    if usage:
        assert usages == [chunks[-1]]
        assert usages[0]["usage"]["prompt_tokens"] == prompt
        assert usages[0]["usage"]["completion_tokens"] == tokens
        assert usages[0]["usage"]["total_tokens"] == prompt + tokens
    else:
        assert usages == []
