"""SIGTERM: /ready turns 503 at once, in-flight streams finish, then the process exits cleanly."""

from __future__ import annotations

import signal
import subprocess
import sys
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
