"""Where the Kubernetes client gets its server and credentials: the pod's service account, or a kubeconfig."""

from __future__ import annotations

import asyncio
from pathlib import Path

import certifi
import pytest
from kubernetes_asyncio.config import incluster_config

from gateway.fleet.discovery.kubernetes import KubernetesDiscovery
from gateway.fleet.registry import Registry
from gateway.settings import KubernetesSettings
from tests.gateway.fleet.discovery.test_kubernetes import _kubeconfig


@pytest.fixture
def in_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a pod sees: the service env vars and a mounted token and CA bundle."""
    token = tmp_path / "token"
    token.write_text("pod-token")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", certifi.where())


@pytest.mark.usefixtures("in_cluster")
async def test_in_cluster_service_account_is_used_by_default() -> None:
    client = await KubernetesDiscovery(KubernetesSettings())._connect()
    try:
        assert client.configuration.host == "https://10.96.0.1:443"
        assert client.configuration.api_key["BearerToken"] == "Bearer pod-token"
    finally:
        await client.close()


@pytest.mark.usefixtures("in_cluster")
async def test_an_explicit_kubeconfig_wins_inside_a_pod(tmp_path: Path) -> None:
    kubeconfig = _kubeconfig(tmp_path / "kubeconfig", "http://127.0.0.1:6443")
    client = await KubernetesDiscovery(KubernetesSettings(kubeconfig=str(kubeconfig)))._connect()
    try:
        assert client.configuration.host == "http://127.0.0.1:6443"
    finally:
        await client.close()


async def test_missing_configuration_is_retried_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    settings = KubernetesSettings(kubeconfig=str(tmp_path / "missing"), backoff_initial=0.01, backoff_max=0.02)
    task = asyncio.create_task(KubernetesDiscovery(settings).run(Registry()))
    await asyncio.sleep(0.2)
    assert not task.done()
    assert any("cannot load Kubernetes client configuration" in r.message for r in caplog.records)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
