"""The conformance target: the simulator by default, or any vLLM-compatible server.

Point the suite at a real vLLM server with environment variables (or override the `target`
fixture in another conftest):

    SWITCHYARD_CONFORMANCE_URL      base URL, e.g. http://127.0.0.1:8000 (no trailing /v1)
    SWITCHYARD_CONFORMANCE_MODEL    served base model name (default: the first card without a parent)
    SWITCHYARD_CONFORMANCE_LORA     a LoRA adapter name served there (optional; LoRA checks skip without)
    SWITCHYARD_CONFORMANCE_API_KEY  bearer key, if the server was started with --api-key
    SWITCHYARD_CONFORMANCE_KV_EVENTS=1               the server publishes KV events (--enable-prefix-caching
                                                     --kv-events-config with a replay_endpoint)
    SWITCHYARD_CONFORMANCE_PROMPT_TOKENS_DETAILS=1   the server runs with --enable-prompt-tokens-details

Without the last two, the KV event and prompt_tokens_details cases check what a server without those flags
answers ({} from /kv_event_sources, no prompt_tokens_details); with them, the full shapes and the events.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest


@dataclass(frozen=True)
class Target:
    url: str
    model: str
    lora: str | None
    api_key: str | None
    kv_events: bool = False  # started with KV events published (PUB + replay endpoints)
    prompt_tokens_details: bool = False  # started with --enable-prompt-tokens-details

    def client(self, timeout: float = 30.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)


def _external(url: str) -> Target:
    api_key = os.environ.get("SWITCHYARD_CONFORMANCE_API_KEY")
    model = os.environ.get("SWITCHYARD_CONFORMANCE_MODEL")
    if model is None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        cards = httpx.get(url.rstrip("/") + "/v1/models", headers=headers, timeout=30).json()["data"]
        model = next(c["id"] for c in cards if c.get("parent") is None)
    env = os.environ.get
    return Target(url.rstrip("/"), model, env("SWITCHYARD_CONFORMANCE_LORA"), api_key,
                  kv_events=env("SWITCHYARD_CONFORMANCE_KV_EVENTS") == "1",
                  prompt_tokens_details=env("SWITCHYARD_CONFORMANCE_PROMPT_TOKENS_DETAILS") == "1")  # fmt: skip


@pytest.fixture(scope="session")
def target() -> Iterator[Target]:
    url = os.environ.get("SWITCHYARD_CONFORMANCE_URL")
    if url:
        yield _external(url)
        return
    events = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": "tcp://*:0",
        "replay_endpoint": "tcp://*:0",
    }
    cmd = [sys.executable, "-m", "worker.sim", "--served-model-name", "conf-base", "--lora", "conf-lora",
           "--port", "0", "--decode-ms-per-token", "1", "--prefill-ms-per-token", "0.01",
           "--enable-prefix-caching", "--kv-events-config", json.dumps(events), "--enable-prompt-tokens-details",
           ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"on (http://\S+)", line)
        if match is None:
            raise RuntimeError(f"simulator did not start: {line}{proc.stderr.read() if proc.stderr else ''}")
        base = match.group(1)
        deadline = time.monotonic() + 10
        while httpx.get(base + "/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        yield Target(base, "conf-base", "conf-lora", None, kv_events=True, prompt_tokens_details=True)
    finally:
        proc.terminate()
        proc.wait(10)
