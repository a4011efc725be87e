"""KubernetesDiscovery against a local server speaking the real list/watch protocol (no cluster)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import yaml

from gateway.fleet.discovery.kubernetes import KubernetesDiscovery
from gateway.fleet.registry import Registry
from gateway.settings import KubernetesSettings
from tests.gateway.fleet.discovery.fake_apiserver import FakeApiServer, endpoint_slice

NS = "serving"
TOKEN = "test-token"  # a fake bearer token for the fake server

Expected = dict[str, bool]  # url -> draining


def _kubeconfig(path: Path, server: str) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": server}}],
                "users": [{"name": "fake", "user": {"token": TOKEN}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": NS}}],
                "current-context": "fake",
            }
        )
    )
    return path


def _state(registry: Registry) -> Expected:
    return {backend.url: backend.draining for backend in registry.backends}


async def converge(registry: Registry, expected: Expected, within: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while _state(registry) != expected:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"registry {_state(registry)} never became {expected}")
        await asyncio.sleep(0.01)


async def until(condition: Callable[[], bool], within: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition never held")
        await asyncio.sleep(0.01)


Start = Callable[..., Awaitable[Registry]]


@pytest.fixture
async def server() -> AsyncIterator[FakeApiServer]:
    fake = FakeApiServer()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def start(server: FakeApiServer, tmp_path: Path) -> AsyncIterator[Start]:
    """Start discovery against the fake server; the task is cancelled (and must stop) at teardown."""
    tasks: list[asyncio.Task[None]] = []
    kubeconfig = _kubeconfig(tmp_path / "kubeconfig", server.url)

    async def _start(**overrides: object) -> Registry:
        options: dict[str, object] = {
            "namespaces": [NS],
            "kubeconfig": str(kubeconfig),
            "backoff_initial": 0.02,
            "backoff_max": 0.1,
        }
        settings = KubernetesSettings.model_validate({**options, **overrides})
        registry = Registry()
        tasks.append(asyncio.create_task(KubernetesDiscovery(settings).run(registry)))
        return registry

    yield _start
    for task in tasks:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)


def url(ip: str) -> str:
    return f"http://{ip}:8000"


async def test_lists_then_follows_adds(server: FakeApiServer, start: Start) -> None:
    server.apply(endpoint_slice("sy-a-x1", NS, [("10.0.0.1", True, False), ("10.0.0.2", True, False)]))
    registry = await start()
    await converge(registry, {url("10.0.0.1"): False, url("10.0.0.2"): False})

    await until(lambda: server.watching == 1)
    server.apply(endpoint_slice("sy-b-y1", NS, [("10.0.1.1", True, False)], port=9000))
    await converge(registry, {url("10.0.0.1"): False, url("10.0.0.2"): False, "http://10.0.1.1:9000": False})
    # The client used the kubeconfig's token, asked for the worker labels, and watched from the listed version.
    path, list_query, auth = server.requests[0]
    assert path == f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices"
    assert auth == f"Bearer {TOKEN}"
    assert list_query["labelSelector"] == "app.kubernetes.io/part-of=switchyard,app.kubernetes.io/component=worker"
    watch_query = server.requests[1][1]
    assert watch_query["watch"].lower() == "true"
    assert watch_query["resourceVersion"] == "101"
    assert watch_query["allowWatchBookmarks"].lower() == "true"


async def test_updates_replace_a_slices_endpoints(server: FakeApiServer, start: Start) -> None:
    server.apply(endpoint_slice("sy-a-x1", NS, [("10.0.0.1", True, False), ("10.0.0.2", True, False)]))
    registry = await start()
    await converge(registry, {url("10.0.0.1"): False, url("10.0.0.2"): False})
    await until(lambda: server.watching == 1)

    # One endpoint goes away, one becomes not ready (e.g. its /health failed), one new one starts loading.
    server.apply(endpoint_slice("sy-a-x1", NS, [("10.0.0.2", False, False), ("10.0.0.3", True, False)]))
    await converge(registry, {url("10.0.0.2"): True, url("10.0.0.3"): False})


async def test_deleted_slice_removes_its_backends(server: FakeApiServer, start: Start) -> None:
    server.apply(endpoint_slice("sy-a-x1", NS, [("10.0.0.1", True, False)]))
    server.apply(endpoint_slice("sy-b-y1", NS, [("10.0.1.1", True, False)]))
    registry = await start()
    await converge(registry, {url("10.0.0.1"): False, url("10.0.1.1"): False})
    await until(lambda: server.watching == 1)

    server.delete(NS, "sy-a-x1")
    await converge(registry, {url("10.0.1.1"): False})


async def test_terminating_endpoints_drain_then_leave(server: FakeApiServer, start: Start) -> None:
    server.apply(endpoint_slice("sy-a-x1", NS, [("10.0.0.1", True, False), ("10.0.0.2", True, False)]))
    registry = await start()
    await converge(registry, {url("10.0.0.1"): False, url("10.0.0.2"): False})
    await until(lambda: server.watching == 1)

    # A rolling update: the old pod is terminating (ready=false, serving=true, terminating=true).
    server.apply(endpoint_slice("sy-a-x1", NS, [("10.0.0.1", False, True), ("10.0.0.2", True, False)]))
    await converge(registry, {url("10.0.0.1"): True, url("10.0.0.2"): False})
    server.apply(endpoint_slice("sy-a-x1", NS, [("10.0.0.2", True, False)]))
    await converge(registry, {url("10.0.0.2"): False})


async def test_gone_in_the_middle_of_a_watch_relists(server: FakeApiServer, start: Start) -> None:
    server.apply(endpoint_slice("sy-a-x1", NS, [("10.0.0.1", True, False)]))
    server.apply(endpoint_slice("sy-b-y1", NS, [("10.0.1.1", True, False)]))
    registry = await start()
    await converge(registry, {url("10.0.0.1"): False, url("10.0.1.1"): False})
    await until(lambda: server.watching == 1)

    # Changes the client never sees as events (the connection drops, then the history is compacted):
    # re-opening the watch from its old version gets ERROR 410, so it must list again.
    lists_before = sum(1 for _, query, _ in server.requests if "watch" not in query)
    server.drop_watches()
    server.delete(NS, "sy-b-y1")
    server.apply(endpoint_slice("sy-c-z1", NS, [("10.0.2.1", True, False)]))
    server.compact()
    await converge(registry, {url("10.0.0.1"): False, url("10.0.2.1"): False})
    assert sum(1 for _, query, _ in server.requests if "watch" not in query) == lists_before + 1

    # And an ERROR 410 event on a live watch: re-list, pick up what the event stream would have missed.
    await until(lambda: server.watching == 1)
    server.expire_watches()
    server.compact()
    server.apply(endpoint_slice("sy-a-x1", NS, [("10.0.0.1", False, True)]))
    server.compact()
    await converge(registry, {url("10.0.0.1"): True, url("10.0.2.1"): False})


async def test_dropped_watch_resumes_from_last_version(server: FakeApiServer, start: Start) -> None:
    server.apply(endpoint_slice("sy-a-x1", NS, [("10.0.0.1", True, False)]))
    registry = await start()
    await converge(registry, {url("10.0.0.1"): False})
    await until(lambda: server.watching == 1)
    server.apply(endpoint_slice("sy-a-x1", NS, [("10.0.0.1", True, False), ("10.0.0.2", True, False)]))
    await converge(registry, {url("10.0.0.1"): False, url("10.0.0.2"): False})
    seen = str(server.version)

    server.drop_watches()
    server.delete(NS, "sy-a-x1")  # happens while the client is disconnected: only the history has it
    server.apply(endpoint_slice("sy-b-y1", NS, [("10.0.1.1", True, False)]))
    await converge(registry, {url("10.0.1.1"): False})
    # It resumed the watch from the last version it had seen instead of listing everything again.
    assert [query for _, query, _ in server.requests if "watch" not in query] == [server.requests[0][1]]
    resumed = [query["resourceVersion"] for _, query, _ in server.requests if "watch" in query]
    assert seen in resumed


async def test_api_errors_back_off_and_recover(server: FakeApiServer, start: Start) -> None:
    server.apply(endpoint_slice("sy-a-x1", NS, [("10.0.0.1", True, False)]))
    server.fail_next(500, 503, 403)
    registry = await start()
    await converge(registry, {url("10.0.0.1"): False})
    assert sum(1 for _, query, _ in server.requests if "watch" not in query) == 4  # three failed, one good


async def test_watch_request_answered_410_relists(server: FakeApiServer, start: Start) -> None:
    server.apply(endpoint_slice("sy-a-x1", NS, [("10.0.0.1", True, False)]))
    registry = await start()
    await converge(registry, {url("10.0.0.1"): False})
    await until(lambda: server.watching == 1)
    server.drop_watches()
    server.fail_next(410)  # the re-opened watch is refused with HTTP 410 itself
    server.apply(endpoint_slice("sy-a-x1", NS, [("10.0.0.9", True, False)]))
    server.compact()
    await converge(registry, {url("10.0.0.9"): False})


async def test_malformed_event_relists(server: FakeApiServer, start: Start) -> None:
    server.apply(endpoint_slice("sy-a-x1", NS, [("10.0.0.1", True, False)]))
    registry = await start()
    await converge(registry, {url("10.0.0.1"): False})
    await until(lambda: server.watching == 1)
    server.send_raw(b'{"type": "MODIFIED", "object": {"metadata"\n')
    server.apply(endpoint_slice("sy-a-x1", NS, [("10.0.0.2", True, False)]))
    await converge(registry, {url("10.0.0.2"): False})
    assert sum(1 for _, query, _ in server.requests if "watch" not in query) == 2


async def test_other_labels_and_ports_are_ignored(server: FakeApiServer, start: Start) -> None:
    server.apply(endpoint_slice("other-x1", NS, [("10.9.0.1", True, False)], labels={"app": "other"}))
    server.apply(endpoint_slice("sy-a-x1", NS, [("10.0.0.1", True, False)], port_name="metrics"))
    server.apply(endpoint_slice("sy-b-x1", NS, [("10.0.1.1", True, False)]))
    registry = await start()
    await converge(registry, {url("10.0.1.1"): False})


async def test_watches_every_namespace(server: FakeApiServer, start: Start) -> None:
    server.apply(endpoint_slice("sy-a-x1", NS, [("10.0.0.1", True, False)]))
    server.apply(endpoint_slice("sy-a-x1", "team-b", [("10.1.0.1", True, False)]))
    server.apply(endpoint_slice("sy-a-x1", "unwatched", [("10.2.0.1", True, False)]))
    registry = await start(namespaces=[NS, "team-b"])
    await converge(registry, {url("10.0.0.1"): False, url("10.1.0.1"): False})
    await until(lambda: server.watching == 2)
    server.delete("team-b", "sy-a-x1")
    await converge(registry, {url("10.0.0.1"): False})


async def test_api_key_from_env_reaches_backends(
    server: FakeApiServer, start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORKER_KEY", "sk-worker")
    server.apply(endpoint_slice("sy-a-x1", NS, [("10.0.0.1", True, False)]))
    registry = await start(api_key_env="WORKER_KEY", scheme="https")
    await converge(registry, {"https://10.0.0.1:8000": False})
    assert registry.backends[0].api_key == "sk-worker"
