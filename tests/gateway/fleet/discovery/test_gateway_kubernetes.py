"""The whole path in one process tree: fake API server -> KubernetesDiscovery -> gateway app -> simulators."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.gateway.fleet.discovery.fake_apiserver import FakeApiServer, endpoint_slice
from tests.gateway.fleet.discovery.test_kubernetes import NS, _kubeconfig
from tests.servers import GatewayServer, running_sims, sim, wait_until


class ThreadedApiServer:
    """FakeApiServer on its own event loop in a thread, so synchronous tests can drive it."""

    def __init__(self) -> None:
        self.server = FakeApiServer()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> ThreadedApiServer:
        self._thread.start()
        self._run(self.server.start())
        return self

    def __exit__(self, *exc: object) -> None:
        self._run(self.server.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)

    def call(self, action: Callable[..., None], *args: Any) -> None:
        async def run() -> None:
            action(*args)

        self._run(run())


@pytest.fixture
def api() -> Iterator[ThreadedApiServer]:
    with ThreadedApiServer() as threaded:
        yield threaded


def _models(gateway: GatewayServer) -> set[str]:
    response = httpx.get(f"{gateway.url}/v1/models", timeout=5)
    return {card["id"] for card in response.json()["data"]}


def test_gateway_routes_to_workers_it_discovers(api: ThreadedApiServer, tmp_path: Path) -> None:
    kubeconfig = _kubeconfig(tmp_path / "kubeconfig", api.server.url)
    with running_sims(sim("alpha"), sim("beta")) as (alpha, beta):
        api.call(api.server.apply, endpoint_slice("sy-alpha-x1", NS, [("127.0.0.1", True, False)], port=alpha.port))
        config = {
            "discovery": "kubernetes",
            "model_refresh_interval": 0.2,
            "kubernetes": {"namespaces": [NS], "kubeconfig": str(kubeconfig), "backoff_initial": 0.05},
        }
        with GatewayServer(config) as gateway:
            wait_until(lambda: _models(gateway) == {"alpha"}, 15, what="alpha discovered")
            wait_until(lambda: httpx.get(f"{gateway.url}/ready").status_code == 200, 5, what="ready")

            api.call(api.server.apply, endpoint_slice("sy-beta-x1", NS, [("127.0.0.1", True, False)], port=beta.port))
            wait_until(lambda: _models(gateway) == {"alpha", "beta"}, 15, what="beta discovered")
            reply = httpx.post(
                f"{gateway.url}/v1/chat/completions",
                json={"model": "beta", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
                timeout=10,
            )
            assert reply.status_code == 200
            assert reply.json()["model"] == "beta"

            # Terminating: no new requests go to beta, while the backend stays known for in-flight ones.
            api.call(api.server.apply, endpoint_slice("sy-beta-x1", NS, [("127.0.0.1", False, True)], port=beta.port))
            wait_until(lambda: _models(gateway) == {"alpha"}, 15, what="beta draining")
            assert any(b.draining for b in gateway.registry.backends if b.url.endswith(f":{beta.port}"))

            api.call(api.server.delete, NS, "sy-beta-x1")
            wait_until(lambda: len(gateway.registry.backends) == 1, 15, what="beta removed")
