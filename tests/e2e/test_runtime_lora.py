"""An adapter loaded at runtime on a worker becomes routable through the gateway within the refresh interval."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.e2e.conftest import REFRESH_INTERVAL, E2EStack

pytestmark = pytest.mark.e2e


def test_runtime_loaded_adapter_becomes_routable(e2e: E2EStack) -> None:
    name = "lora-runtime"
    loaded = httpx.post(
        f"{e2e.chat_worker}/v1/load_lora_adapter",
        json={"lora_name": name, "lora_path": str(e2e.models.adapter("lora-b"))},
        timeout=60,
    )
    assert loaded.status_code == 200, loaded.text
    try:
        started = time.monotonic()
        client = e2e.client()
        while name not in {m.id for m in client.models.list().data}:
            # One refresh period plus the poll itself and scheduling slack on a busy 2-core machine.
            assert time.monotonic() - started < REFRESH_INTERVAL + 2.0, "adapter not listed by the gateway"
            time.sleep(0.1)
        r = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0
        )
        assert r.model == name
        assert r.choices[0].message.content
    finally:
        httpx.post(f"{e2e.chat_worker}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=60)
