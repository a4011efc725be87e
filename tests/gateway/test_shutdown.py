"""SIGTERM: /ready turns 503 at once, in-flight streams finish, then the process exits cleanly."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.servers import free_port, running_sims, sim, wait_until


def test_sigterm_drains_then_exits(tmp_path: Path) -> None:
    with running_sims(sim("m", "--decode-ms-per-token", "20", fast=False)) as (upstream,):
        config = tmp_path / "gateway.yaml"
        config.write_text(f"backends: [{{url: '{upstream.url}'}}]\nshutdown: {{drain_delay: 1.0, grace_period: 20}}\n")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
            stderr=subprocess.PIPE,
        )
        try:
            wait_until(lambda: httpx.get(url + "/ready").status_code == 200, 20, what="gateway ready")
            body = {"model": "m", "prompt": "x", "max_tokens": 100, "stream": True, "ignore_eos": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as response:
                chunks = response.iter_text()
                received = next(chunks)
                process.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                wait_until(lambda: httpx.get(url + "/ready").status_code == 503, 1.0, what="/ready to turn 503")
                received += "".join(chunks)
            assert received.rstrip().endswith("data: [DONE]")
            assert received.count('"text"') >= 100  # every token arrived: the stream was not cut
            assert process.wait(20) == 0
            assert time.monotonic() - signalled >= 1.0  # the listener stayed up for drain_delay
            with pytest.raises(httpx.ConnectError):
                httpx.get(url + "/health")
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def started_gateway(tmp_path: Path, upstream_url: str, shutdown: str) -> tuple[subprocess.Popen[bytes], str]:
    config = tmp_path / "gateway.yaml"
    config.write_text(f"backends: [{{url: '{upstream_url}'}}]\nshutdown: {shutdown}\n")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(url + "/ready").status_code == 200, 20, what="gateway ready")
    return process, url


@pytest.mark.parametrize(
    ("shutdown", "signals", "within"),
    [
        ("{drain_delay: 0, grace_period: 0}", 1, 3.0),  # nothing waited for
        ("{drain_delay: 0, grace_period: 0.5}", 1, 3.0),  # half a second, rounded up to one
        ("{drain_delay: 10, grace_period: 30}", 2, 3.0),  # the second signal: at once
    ],
    ids=["no-grace", "short-grace", "second-signal"],
)
def test_shutdown_waits_no_longer_than_it_is_told(tmp_path: Path, shutdown: str, signals: int, within: float) -> None:
    """A request that would take 10 s is in flight: the process ends within its grace period (0 is none, not
    forever), and a second SIGTERM ends it at once, however long the drain and the grace."""
    with running_sims(sim("m", "--decode-ms-per-token", "100", fast=False)) as (upstream,):
        process, url = started_gateway(tmp_path, upstream.url, shutdown)
        try:
            body = {"model": "m", "prompt": "x", "max_tokens": 100, "ignore_eos": True}
            slow = threading.Thread(target=lambda: httpx.post(url + "/v1/completions", json=body, timeout=30))
            slow.start()
            wait_until(lambda: upstream.metric("vllm:num_requests_running") == 1, 10, what="the request running")
            signalled = time.monotonic()
            for _ in range(signals):
                process.send_signal(signal.SIGTERM)
                time.sleep(0.3)
            process.wait(15)
            assert time.monotonic() - signalled < within
            slow.join(15)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
