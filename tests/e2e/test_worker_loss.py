"""One worker killed: the other model is still served, the dead one's model is a prompt 503 (not a hang).

Runs last in the suite (file order): it kills the embedding worker for good.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import E2EStack
from worker import procs

pytestmark = pytest.mark.e2e


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def test_killed_worker_leaves_the_other_model_served_and_its_own_503(e2e: E2EStack) -> None:
    embed = next(c for c in e2e.stack.workers if c.name == "embed")
    # A crashed pod: SIGKILL vLLM's process group (server and engine core), then the launcher's.
    for pid in _children(embed.process.pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(os.getpgid(pid), signal.SIGKILL)
    procs.signal_group(embed.process, signal.SIGKILL)
    embed.process.wait(30)
    with httpx.Client(base_url=e2e.gateway, timeout=30) as http:
        body = {"model": "minilm", "input": "hello"}
        deadline = time.monotonic() + 10
        while True:
            started = time.monotonic()
            r = http.post("/v1/embeddings", json=body)
            assert time.monotonic() - started < 5, "a request for the dead model hung"
            if r.status_code == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["message"]
        chat = http.post(
            "/v1/chat/completions",
            json={"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5},
        )
        assert chat.status_code == 200, chat.text
        assert chat.json()["choices"][0]["message"]["content"]
