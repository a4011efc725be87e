"""The chart, rendered by the real Helm engine: lint, Kubernetes schemas, and the properties that matter."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate  # type: ignore[import-untyped]
import kubernetes_validate.utils  # type: ignore[import-untyped]
import pytest
import yaml

from gateway.settings import load_settings
from tests.helm.chart import (
    CHART,
    CI_VALUES,
    CRD_KINDS,
    NAMESPACE,
    RELEASE,
    Obj,
    load_values,
    named,
    notes,
    of_kind,
    pod_specs,
    render,
    workers,
)


def _k8s_versions() -> list[str]:
    """The oldest version the chart supports (Chart.yaml kubeVersion) or the oldest schema the installed
    kubernetes-validate still ships, two in between, and the newest it knows."""
    available = sorted(
        {".".join(v.lstrip("v").split(".")[:2]) for v in kubernetes_validate.utils.all_versions()},
        key=lambda v: tuple(int(part) for part in v.split(".")),
    )
    supported = [v for v in available if tuple(map(int, v.split("."))) >= (1, 27)]
    picks = {supported[0], supported[len(supported) // 3], supported[2 * len(supported) // 3], supported[-1]}
    return sorted((f"{v}.0" for v in picks), key=lambda v: tuple(int(part) for part in v.split(".")))


K8S_VERSIONS = _k8s_versions()
CI_IDS = [path.stem for path in CI_VALUES]


@pytest.fixture(scope="module", params=CI_VALUES, ids=CI_IDS)
def ci_objects(request: pytest.FixtureRequest) -> list[Obj]:
    return render(load_values(request.param))


@pytest.fixture(scope="module")
def ci() -> dict[str, list[Obj]]:
    return {path.stem: render(load_values(path)) for path in CI_VALUES}


def test_every_ci_value_set_exists() -> None:
    assert set(CI_IDS) >= {
        "minimal-values",
        "multi-model-gpu-values",
        "lora-values",
        "nodeport-ingress-values",
        "monitoring-values",
    }


@pytest.mark.parametrize("values_file", [None, *CI_VALUES], ids=["defaults", *CI_IDS])
def test_lint_is_clean(values_file: Path | None) -> None:
    report = helm.lint(str(CHART), load_values(values_file) if values_file else None, strict=True)
    assert report["errors"] == []
    # Severity 2 and up are warnings and errors; "icon is recommended" (info) is fine.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


PROJECT_URL = "https://github.com/switchyard-project/switchyard"


def test_chart_metadata_names_the_project_and_its_maintainers(tmp_path: Path) -> None:
    metadata = helm.Chart.load(str(CHART)).metadata  # as Helm parsed Chart.yaml
    assert metadata["home"] == PROJECT_URL
    assert metadata["sources"] == [PROJECT_URL]
    assert metadata["maintainers"]
    assert all(maintainer["name"] for maintainer in metadata["maintainers"])
    assert all(maintainer.get("url", PROJECT_URL).startswith("https://") for maintainer in metadata["maintainers"])
    # Helm's lint checks maintainers: the same file with a nameless one is an error, so the clean lint above counts.
    copy = tmp_path / "switchyard"
    shutil.copytree(CHART, copy)
    chart_yaml = yaml.safe_load((copy / "Chart.yaml").read_text())
    chart_yaml["maintainers"] = [{"url": PROJECT_URL}]
    (copy / "Chart.yaml").write_text(yaml.safe_dump(chart_yaml))
    assert "each maintainer requires a name" in helm.lint(str(copy), strict=True)["errors"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_objects_match_kubernetes_schemas(ci_objects: list[Obj], version: str) -> None:
    for obj in ci_objects:
        if obj["kind"] in CRD_KINDS:
            continue  # no schema in kubernetes-validate; their shape is asserted in test_crd_objects_shape
        kubernetes_validate.validate(obj, version, strict=True)


def test_crd_objects_shape(ci: dict[str, list[Obj]]) -> None:
    seen = {obj["kind"] for objects in ci.values() for obj in objects} & CRD_KINDS
    assert seen == {"ServiceMonitor", "PodMonitor", "ScaledObject", "HTTPRoute"} | (
        {"PrometheusRule"} if list((CHART / "alerts").glob("*.yaml")) else set()
    )
    versions = {
        "ServiceMonitor": "monitoring.coreos.com/v1",
        "PodMonitor": "monitoring.coreos.com/v1",
        "PrometheusRule": "monitoring.coreos.com/v1",
        "ScaledObject": "keda.sh/v1alpha1",
        "HTTPRoute": "gateway.networking.k8s.io/v1",
    }
    for objects in ci.values():
        for obj in objects:
            if obj["kind"] in CRD_KINDS:
                assert obj["apiVersion"] == versions[obj["kind"]]
                assert obj["metadata"]["namespace"] == NAMESPACE
                assert isinstance(obj["spec"], dict)
                assert obj["spec"]


def test_common_labels_and_names(ci_objects: list[Obj]) -> None:
    for obj in ci_objects:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "switchyard"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/part-of"] == "switchyard"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert len(obj["metadata"]["name"]) <= 63
        assert obj["metadata"]["namespace"] == NAMESPACE


def test_selectors_match_their_pods(ci_objects: list[Obj]) -> None:
    deployments = of_kind(ci_objects, "Deployment")
    for deployment in deployments:
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
        # Selectors are immutable: only stable labels in them.
        assert not {"helm.sh/chart", "app.kubernetes.io/version"} & selector.keys()
    for service in of_kind(ci_objects, "Service"):
        selected = [
            d
            for d in deployments
            if service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(selected) == 1, f"Service {service['metadata']['name']} selects {len(selected)} Deployments"
    for pdb in of_kind(ci_objects, "PodDisruptionBudget"):
        gateway = named(ci_objects, "Deployment", f"{RELEASE}-switchyard-gateway")
        assert pdb["spec"]["selector"]["matchLabels"] == gateway["spec"]["selector"]["matchLabels"]


def _gateway_config_text(objects: list[Obj]) -> str:
    text: str = named(objects, "ConfigMap", f"{RELEASE}-switchyard-gateway")["data"]["config.yaml"]
    return text


def _gateway_config(objects: list[Obj]) -> Obj:
    config: Obj = yaml.safe_load(_gateway_config_text(objects))
    return config


def _selector_matches(selector: str, labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, _, value in (term.partition("=") for term in selector.split(",")))


def test_discovery_finds_exactly_the_worker_services(ci_objects: list[Obj]) -> None:
    config = _gateway_config(ci_objects)
    assert config["discovery"] == "kubernetes"
    assert config["kubernetes"]["namespaces"] == [NAMESPACE]
    selector = config["kubernetes"]["label_selector"]
    worker_deployments = workers(ci_objects)
    # EndpointSlices carry their Service's labels: the selector must pick exactly the worker Services.
    picked = [s for s in of_kind(ci_objects, "Service") if _selector_matches(selector, s["metadata"]["labels"])]
    assert len(picked) == len(worker_deployments) >= 1
    deployments = {d["metadata"]["name"]: d for d in worker_deployments}
    for service in picked:
        assert service["spec"]["clusterIP"] == "None"
        # the API port, then vLLM's KV event sockets where the model has them; the gateway reads them by name
        container = deployments[service["metadata"]["name"]]["spec"]["template"]["spec"]["containers"][0]
        declared = [port["name"] for port in container["ports"]]
        assert declared in (["http", "kv-events", "kv-replay"], ["http"])
        assert [port["name"] for port in service["spec"]["ports"]] == declared
        port = service["spec"]["ports"][0]
        assert port["name"] == config["kubernetes"]["port_name"] == "http"
        assert port["targetPort"] == "http"


def test_gateway_config_is_accepted_by_the_gateway(
    ci_objects: list[Obj], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORKER_API_KEY", "sk-test")  # the chart's env name, set from the Secret in the pod
    path = tmp_path / "config.yaml"
    path.write_text(named(ci_objects, "ConfigMap", f"{RELEASE}-switchyard-gateway")["data"]["config.yaml"])
    settings = load_settings(path)
    assert settings.discovery == "kubernetes"
    assert settings.port == 8080


def test_config_checksum_rolls_the_gateway() -> None:
    def checksum(values: Obj) -> str:
        gateway = named(render(values), "Deployment", f"{RELEASE}-switchyard-gateway")
        annotation: str = gateway["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        return annotation

    assert checksum({}) == checksum({})
    assert checksum({}) != checksum({"gateway": {"config": {"model_refresh_interval": 9}}})


def test_rbac_reads_endpointslices_only(ci_objects: list[Obj]) -> None:
    assert not of_kind(ci_objects, "ClusterRole")
    assert not of_kind(ci_objects, "ClusterRoleBinding")
    (role,) = of_kind(ci_objects, "Role")
    assert role["rules"] == [
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]}
    ]
    (binding,) = of_kind(ci_objects, "RoleBinding")
    (account,) = of_kind(ci_objects, "ServiceAccount")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": NAMESPACE}
    ]
    gateway = named(ci_objects, "Deployment", f"{RELEASE}-switchyard-gateway")["spec"]["template"]["spec"]
    assert gateway["serviceAccountName"] == account["metadata"]["name"]
    # Only the gateway gets an API token.
    assert account["automountServiceAccountToken"] is False
    for name, spec in pod_specs(ci_objects):
        assert spec["automountServiceAccountToken"] is (name == f"{RELEASE}-switchyard-gateway")


def test_restricted_security_context(ci_objects: list[Obj]) -> None:
    for name, spec in pod_specs(ci_objects):
        # Service links put <SERVICE>_PORT=tcp://... into the environment; with a Service named "switchyard"
        # that is SWITCHYARD_PORT, which the gateway and the worker launcher read as settings.
        assert spec["enableServiceLinks"] is False, name
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, name
        assert pod["runAsUser"] != 0
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"] == {"drop": ["ALL"]}
            assert "privileged" not in context
        if not name.endswith(("-llama-8b", "-qwen-72b", "-embed")):  # vLLM writes caches; others write nothing
            assert all(c["securityContext"]["readOnlyRootFilesystem"] for c in spec["containers"]), name


RESTRICTED_POD = {
    "runAsNonRoot": True,
    "runAsUser": 10001,
    "runAsGroup": 10001,
    "fsGroup": 10001,
    "seccompProfile": {"type": "RuntimeDefault"},
}
RESTRICTED_CONTAINER = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _contexts(objects: list[Obj], name: str) -> tuple[Obj, Obj]:
    """(pod securityContext, container securityContext) of the Deployment or Pod called name."""
    spec = dict(pod_specs(objects))[name]
    pod: Obj = spec.get("securityContext", {})
    container: Obj = spec["containers"][0].get("securityContext", {})
    return pod, container


def test_default_security_contexts_are_the_restricted_ones() -> None:
    values = {"models": [{"name": "sim", "simulator": True}, {"name": "real", "source": {"pvc": {"claimName": "m"}}}]}
    objects = render(values)
    for name, read_only in [
        (f"{RELEASE}-switchyard-gateway", True),
        (f"{RELEASE}-switchyard-test-models", True),
        (f"{RELEASE}-switchyard-sim", True),
        (f"{RELEASE}-switchyard-real", False),  # vLLM writes caches under $HOME and /tmp
    ]:
        assert _contexts(objects, name) == (
            RESTRICTED_POD,
            {**RESTRICTED_CONTAINER, "readOnlyRootFilesystem": read_only},
        )


def test_security_contexts_come_from_values() -> None:
    values: Obj = {
        "gateway": {
            # OpenShift assigns the IDs itself: null drops a default key, the others stay.
            "podSecurityContext": {"runAsUser": None, "runAsGroup": None, "fsGroup": None},
            "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
        },
        "workerDefaults": {
            "podSecurityContext": {"runAsUser": 2000, "fsGroupChangePolicy": "OnRootMismatch"},
            "securityContext": {"capabilities": {"drop": ["ALL"], "add": ["IPC_LOCK"]}},
        },
        "models": [
            {"name": "real", "source": {"pvc": {"claimName": "m"}}},
            {
                "name": "locked",
                "source": {"pvc": {"claimName": "m"}},
                "securityContext": {"readOnlyRootFilesystem": True},
            },
            {"name": "sim", "simulator": True},
            {"name": "sim-rw", "simulator": True, "securityContext": {"readOnlyRootFilesystem": False}},
            {"name": "uid", "simulator": True, "podSecurityContext": {"runAsUser": 3000}},
        ],
    }
    objects = render(values)
    gateway_pod = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    gateway_container = {
        **RESTRICTED_CONTAINER,
        "readOnlyRootFilesystem": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert _contexts(objects, f"{RELEASE}-switchyard-gateway") == (gateway_pod, gateway_container)
    # the helm test pod runs from the gateway image and follows the gateway's contexts
    assert _contexts(objects, f"{RELEASE}-switchyard-test-models") == (gateway_pod, gateway_container)

    worker_pod = {**RESTRICTED_POD, "runAsUser": 2000, "fsGroupChangePolicy": "OnRootMismatch"}
    worker_container = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"], "add": ["IPC_LOCK"]}}
    expected = {
        "real": (worker_pod, {**worker_container, "readOnlyRootFilesystem": False}),
        "locked": (worker_pod, {**worker_container, "readOnlyRootFilesystem": True}),
        "sim": (worker_pod, {**worker_container, "readOnlyRootFilesystem": True}),
        "sim-rw": (worker_pod, {**worker_container, "readOnlyRootFilesystem": False}),
        "uid": ({**worker_pod, "runAsUser": 3000}, {**worker_container, "readOnlyRootFilesystem": True}),
    }
    for model, contexts in expected.items():
        assert _contexts(objects, f"{RELEASE}-switchyard-{model}") == contexts, model
    for version in K8S_VERSIONS:
        for obj in objects:
            if obj["kind"] not in CRD_KINDS:
                kubernetes_validate.validate(obj, version, strict=True)


GATEWAY_DIGEST = "sha256:" + "a1" * 32
WORKER_DIGEST = "sha256:" + "b2" * 32
QWEN_DIGEST = "sha512:" + "c3" * 64


def _images(objects: list[Obj]) -> dict[str, str]:
    return {name: spec["containers"][0]["image"] for name, spec in pod_specs(objects)}


def test_image_digests_pin_the_images_and_override_the_tag() -> None:
    models: list[Obj] = [
        {"name": "llama", "source": {"pvc": {"claimName": "m"}}},
        {"name": "tagged", "source": {"pvc": {"claimName": "m"}}, "image": {"tag": "0.9.9"}},
        {
            "name": "qwen",
            "source": {"pvc": {"claimName": "m"}},
            "image": {"repository": "reg/qwen", "digest": QWEN_DIGEST},
        },
        {"name": "sim", "simulator": True},
        {"name": "own", "source": {"pvc": {"claimName": "m"}}, "image": {"repository": "reg/own", "digest": ""}},
    ]
    prefix = f"{RELEASE}-switchyard"
    assert _images(render({"models": models})) == {
        f"{prefix}-gateway": "switchyard/gateway:0.1.0",
        f"{prefix}-test-models": "switchyard/gateway:0.1.0",
        f"{prefix}-llama": "switchyard/worker:0.1.0",
        f"{prefix}-tagged": "switchyard/worker:0.9.9",
        f"{prefix}-qwen": f"reg/qwen@{QWEN_DIGEST}",
        f"{prefix}-sim": "switchyard/gateway:0.1.0",
        f"{prefix}-own": "reg/own:0.1.0",
    }
    values: Obj = {
        "image": {"repository": "reg/gateway", "tag": "1.2.3", "digest": GATEWAY_DIGEST},
        "workerDefaults": {"image": {"digest": WORKER_DIGEST}},
        "models": models,
    }
    objects = render(values)
    assert _images(objects) == {
        # the gateway image serves the gateway, the helm test pod and the simulators
        f"{prefix}-gateway": f"reg/gateway@{GATEWAY_DIGEST}",
        f"{prefix}-test-models": f"reg/gateway@{GATEWAY_DIGEST}",
        f"{prefix}-sim": f"reg/gateway@{GATEWAY_DIGEST}",
        f"{prefix}-llama": f"switchyard/worker@{WORKER_DIGEST}",
        f"{prefix}-tagged": f"switchyard/worker@{WORKER_DIGEST}",  # the digest wins over a model's tag
        f"{prefix}-qwen": f"reg/qwen@{QWEN_DIGEST}",  # a model's own digest wins over workerDefaults'
        f"{prefix}-own": "reg/own:0.1.0",  # digest "" in a model drops the inherited one
    }
    for version in K8S_VERSIONS:
        for obj in objects:
            if obj["kind"] not in CRD_KINDS:
                kubernetes_validate.validate(obj, version, strict=True)


def test_probes(ci_objects: list[Obj]) -> None:
    gateway = named(ci_objects, "Deployment", f"{RELEASE}-switchyard-gateway")
    (container,) = gateway["spec"]["template"]["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    for deployment in workers(ci_objects):
        spec = deployment["spec"]["template"]["spec"]
        (worker,) = spec["containers"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert worker[probe]["httpGet"] == {"path": "/health", "port": "http"}
        startup = worker["startupProbe"]["periodSeconds"] * worker["startupProbe"]["failureThreshold"]
        if "command" in worker:  # the simulator starts in a second
            assert startup >= 30
        else:  # a real model may download and load for a long time
            assert startup >= 1800
            assert spec["terminationGracePeriodSeconds"] >= 300
            assert {"name": "SWITCHYARD_WORKER_STARTUP_TIMEOUT", "value": str(startup)} in worker["env"]


def test_gpu_resources_and_scheduling(ci: dict[str, list[Obj]]) -> None:
    objects = ci["multi-model-gpu-values"]

    def container(name: str) -> Obj:
        deployment = named(objects, "Deployment", f"{RELEASE}-switchyard-{name}")
        result: Obj = deployment["spec"]["template"]["spec"]["containers"][0]
        return result

    llama, qwen = container("llama-8b"), container("qwen-72b")
    assert llama["resources"]["limits"]["nvidia.com/gpu"] == llama["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert qwen["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert qwen["resources"]["limits"]["memory"] == "300Gi"
    assert qwen["args"][qwen["args"].index("--tensor-parallel-size") :][:2] == ["--tensor-parallel-size", "4"]
    qwen_pod = named(objects, "Deployment", f"{RELEASE}-switchyard-qwen-72b")["spec"]["template"]["spec"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "32Gi"}} in qwen_pod["volumes"]
    assert {"name": "models", "persistentVolumeClaim": {"claimName": "model-store", "readOnly": True}} in qwen_pod[
        "volumes"
    ]
    assert qwen["args"][:2] == ["--model", "/models/qwen2.5-72b-instruct"]
    assert qwen_pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert qwen_pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert "nodeAffinity" in qwen_pod["affinity"]
    llama_pod = named(objects, "Deployment", f"{RELEASE}-switchyard-llama-8b")["spec"]["template"]["spec"]
    assert {"name": "cache", "persistentVolumeClaim": {"claimName": "hf-cache"}} in llama_pod["volumes"]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}}} in llama["env"]
    assert llama["args"][:6] == [
        "--model",
        "meta-llama/Llama-3.1-8B-Instruct",
        "--served-model-name",
        "llama-3.1-8b-instruct",
        "--served-model-name",
        "llama",
    ]
    assert named(objects, "Deployment", f"{RELEASE}-switchyard-llama-8b")["spec"]["replicas"] == 2
    for objects_ in ci.values():  # simulators never ask for a GPU
        for deployment in workers(objects_):
            worker = deployment["spec"]["template"]["spec"]["containers"][0]
            if worker.get("command") == ["python", "-m", "worker.sim"]:
                assert "nvidia.com/gpu" not in json.dumps(worker["resources"])


def test_lora_adapters_reach_the_worker(ci: dict[str, list[Obj]]) -> None:
    objects = ci["lora-values"]
    llama = named(objects, "Deployment", f"{RELEASE}-switchyard-llama-8b")["spec"]["template"]["spec"]["containers"][0]
    args = llama["args"]
    assert "--lora" in args
    assert [args[i + 1] for i, arg in enumerate(args) if arg == "--lora"] == [
        "sql-lora=yard/llama-3.1-8b-sql-lora",
        "support-lora=/adapters/support",
    ]
    assert {"name": "adapters", "mountPath": "/adapters", "readOnly": True} in llama["volumeMounts"]
    assert args[args.index("--") + 1 :] == ["--max-loras", "4", "--max-lora-rank", "64"]
    sim = named(objects, "Deployment", f"{RELEASE}-switchyard-sim")["spec"]["template"]["spec"]["containers"][0]
    assert sim["command"] == ["python", "-m", "worker.sim"]
    assert sim["args"][:2] == ["--served-model-name", "sim-base"]
    assert [sim["args"][i + 1] for i, arg in enumerate(sim["args"]) if arg == "--lora"] == ["sim-lora-a", "sim-lora-b"]
    test_pod = of_kind(objects, "Pod")[0]["spec"]["containers"][0]
    assert test_pod["args"][1:] == ["llama-3.1-8b-instruct", "sim-base"]


def test_service_types_ingress_and_route(ci: dict[str, list[Obj]]) -> None:
    default_service = named(ci["minimal-values"], "Service", f"{RELEASE}-switchyard-gateway")
    assert default_service["spec"]["type"] == "ClusterIP"
    objects = ci["nodeport-ingress-values"]
    service = named(objects, "Service", f"{RELEASE}-switchyard-gateway")
    assert service["spec"]["type"] == "NodePort"
    assert service["spec"]["ports"][0]["nodePort"] == 30080
    assert service["spec"]["externalTrafficPolicy"] == "Local"
    (ingress,) = of_kind(objects, "Ingress")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"secretName": "llm-example-com-tls", "hosts": ["llm.example.com"]}]
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "llm.example.com"
    assert rule["http"]["paths"][0]["backend"]["service"] == {
        "name": f"{RELEASE}-switchyard-gateway",
        "port": {"name": "http"},
    }
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    (route,) = of_kind(objects, "HTTPRoute")
    assert route["spec"]["parentRefs"] == [{"name": "public", "namespace": "gateway-system", "sectionName": "https"}]
    assert route["spec"]["rules"][0]["backendRefs"] == [{"name": f"{RELEASE}-switchyard-gateway", "port": 80}]
    balancer = render({"service": {"type": "LoadBalancer", "loadBalancerSourceRanges": ["10.0.0.0/8"]}})
    assert named(balancer, "Service", f"{RELEASE}-switchyard-gateway")["spec"]["loadBalancerSourceRanges"] == [
        "10.0.0.0/8"
    ]


def test_notes_say_how_to_reach_the_gateway() -> None:
    text = notes(load_values(CHART / "ci" / "nodeport-ingress-values.yaml"))
    assert "NodePort" in text
    assert "jsonpath='{.spec.ports[0].nodePort}'" in text
    assert "https://llm.example.com" in text
    assert f"kubectl port-forward -n {NAMESPACE} svc/{RELEASE}-switchyard-gateway 8080:80" in text
    assert "/v1/models" in text


def test_monitoring_objects(ci: dict[str, list[Obj]]) -> None:
    objects = ci["monitoring-values"]
    (monitor,) = of_kind(objects, "ServiceMonitor")
    gateway_service = named(objects, "Service", f"{RELEASE}-switchyard-gateway")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= gateway_service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == "http"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (pod_monitor,) = of_kind(objects, "PodMonitor")
    for deployment in workers(objects):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (scaled,) = of_kind(objects, "ScaledObject")
    target = named(objects, "Deployment", scaled["spec"]["scaleTargetRef"]["name"])
    assert "replicas" not in target["spec"]  # KEDA owns the count
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger["metadata"]["query"] == (
        f'sum(vllm:num_requests_waiting{{namespace="{NAMESPACE}",model_name="llama-3.1-8b-instruct"}})'
    )
    assert trigger["metadata"]["threshold"] == "10"
    (hpa,) = of_kind(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == f"{RELEASE}-switchyard-gateway"
    assert "replicas" not in named(objects, "Deployment", f"{RELEASE}-switchyard-gateway")["spec"]
    (policy,) = of_kind(objects, "NetworkPolicy")
    gateway_labels = named(objects, "Deployment", f"{RELEASE}-switchyard-gateway")["spec"]["selector"]["matchLabels"]
    peers = policy["spec"]["ingress"][0]["from"]
    assert peers[0] == {"podSelector": {"matchLabels": gateway_labels}}
    assert "namespaceSelector" in peers[1]
    assert "podSelector" in peers[1]
    # The shared worker key reaches both sides from the Secret, never as a literal.
    gateway = named(objects, "Deployment", f"{RELEASE}-switchyard-gateway")["spec"]["template"]["spec"]["containers"][0]
    key_ref = {"secretKeyRef": {"name": "switchyard-worker-key", "key": "api-key"}}
    assert {"name": "WORKER_API_KEY", "valueFrom": key_ref} in gateway["env"]
    assert _gateway_config(objects)["kubernetes"]["api_key_env"] == "WORKER_API_KEY"
    for deployment in workers(objects):
        worker = deployment["spec"]["template"]["spec"]["containers"][0]
        assert {"name": "SWITCHYARD_WORKER_API_KEY", "valueFrom": key_ref} in worker["env"]
    assert _gateway_config(objects)["timeouts"] == {"idle": 300}


def test_monitoring_is_off_by_default() -> None:
    kinds = {obj["kind"] for obj in render()}
    assert not kinds & (CRD_KINDS | {"NetworkPolicy", "HorizontalPodAutoscaler", "Ingress"})


def _chart_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "switchyard"
    shutil.copytree(CHART, copy)
    for folder in ("dashboards", "alerts"):  # absent until dashboards and alerts are written
        (copy / folder).mkdir(exist_ok=True)
        for path in (copy / folder).glob("*"):
            path.unlink()
    return copy


def test_dashboards_and_alerts_come_from_the_chart_folders(tmp_path: Path) -> None:
    chart = _chart_copy(tmp_path)
    values = load_values(CHART / "ci" / "monitoring-values.yaml")
    empty = render(values, chart=chart)
    assert not of_kind(empty, "PrometheusRule")
    assert not [c for c in of_kind(empty, "ConfigMap") if "grafana_dashboard" in c["metadata"]["labels"]]

    dashboard = {"title": "Switchyard gateway", "panels": [], "schemaVersion": 39}
    (chart / "dashboards" / "Gateway_Overview.json").write_text(json.dumps(dashboard))
    (chart / "dashboards" / "workers.json").write_text(json.dumps({**dashboard, "title": "Workers"}))
    rule = {"alert": "SwitchyardNoBackends", "expr": "sum(switchyard_backend_up) == 0", "for": "2m"}
    (chart / "alerts" / "gateway.yaml").write_text(yaml.safe_dump({"groups": [{"name": "gw", "rules": [rule]}]}))
    (chart / "alerts" / "workers.yaml").write_text(yaml.safe_dump({"groups": [{"name": "wk", "rules": [rule]}]}))
    objects = render(values, chart=chart)

    maps = [c for c in of_kind(objects, "ConfigMap") if c["metadata"]["labels"].get("grafana_dashboard") == "1"]
    assert sorted(c["metadata"]["name"] for c in maps) == [
        f"{RELEASE}-switchyard-dashboard-gateway-overview",
        f"{RELEASE}-switchyard-dashboard-workers",
    ]
    gateway_map = next(c for c in maps if c["metadata"]["name"].endswith("gateway-overview"))
    assert json.loads(gateway_map["data"]["Gateway_Overview.json"]) == dashboard
    assert gateway_map["metadata"]["annotations"] == {"grafana_folder": "Switchyard"}
    (rules,) = of_kind(objects, "PrometheusRule")
    assert [group["name"] for group in rules["spec"]["groups"]] == ["gw", "wk"]
    assert rules["spec"]["groups"][0]["rules"] == [rule]
    for version in K8S_VERSIONS[:1]:
        for config_map in maps:
            kubernetes_validate.validate(config_map, version, strict=True)


def test_the_shipped_dashboards_and_alerts_render() -> None:
    objects = render(load_values(CHART / "ci" / "monitoring-values.yaml"))
    dashboards = list((CHART / "dashboards").glob("*.json"))
    maps = [c for c in of_kind(objects, "ConfigMap") if c["metadata"]["labels"].get("grafana_dashboard") == "1"]
    assert len(maps) == len(dashboards)
    for config_map in maps:
        for text in config_map["data"].values():
            json.loads(text)


def test_alert_thresholds_come_from_values(tmp_path: Path) -> None:
    values = load_values(CHART / "ci" / "monitoring-values.yaml")
    thresholds = {"errorRatio": 0.1, "ttftP95Seconds": 1.5, "engineQueue": 20}
    values["metrics"]["prometheusRule"]["thresholds"] = thresholds
    (rules,) = of_kind(render(values), "PrometheusRule")
    expressions = {rule["alert"]: rule["expr"] for group in rules["spec"]["groups"] for rule in group["rules"]}
    assert expressions["SwitchyardHighErrorRatio"].rstrip().endswith("> 0.1")
    assert expressions["SwitchyardHighTimeToFirstToken"].rstrip().endswith(") > 1.5")
    assert "(vllm:num_requests_waiting) > 20\nand" in expressions["SwitchyardEngineQueueGrowing"]
    (defaults,) = of_kind(render(load_values(CHART / "ci" / "monitoring-values.yaml")), "PrometheusRule")
    # the file unchanged, but for the gateway job, which the chart knows exactly
    text = (CHART / "alerts" / "switchyard.yaml").read_text()
    text = text.replace(
        'job=~".*switchyard.*gateway.*"', f'job="{RELEASE}-switchyard-gateway", namespace="{NAMESPACE}"'
    )
    shipped = yaml.safe_load(text)
    assert defaults["spec"]["groups"] == shipped["groups"], "default thresholds must render the file unchanged"

    # a rule file edited so the threshold is no longer where the chart looks fails the render, naming it
    chart = _chart_copy(tmp_path)
    edited = (CHART / "alerts" / "switchyard.yaml").read_text().replace("> 0.05", ">= 0.05")
    (chart / "alerts" / "switchyard.yaml").write_text(edited)
    with pytest.raises(Exception, match="SwitchyardHighErrorRatio no longer contains"):
        render(values, chart=chart)


BAD_VALUES: list[tuple[Obj, str]] = [
    ({"gateway": {"replcas": 3}}, "replcas"),
    ({"service": {"type": "Nodeport"}}, "/service/type"),
    ({"service": {"type": "NodePort", "nodePort": 80}}, "/service/nodePort"),
    ({"models": [{"name": "x", "gpu": 1}]}, "gpu"),
    ({"models": [{"name": "Llama_8B", "simulator": True}]}, "/models/0/name"),
    ({"models": [{"simulator": True}]}, "name"),
    ({"workerDefaults": {"cache": {"type": "hostPath"}}}, "/workerDefaults/cache/type"),
    ({"models": [{"name": "a", "source": {"huggingface": {"id": "x/y"}}}]}, "huggingface"),
    ({"metrics": {"serviceMonitor": {"enable": True}}}, "enable"),
    ({"metrics": {"prometheusRule": {"thresholds": {"errorRatio": 5}}}}, "errorRatio"),
    ({"metrics": {"prometheusRule": {"thresholds": {"ttft": 1}}}}, "ttft"),
    (
        {"models": [{"name": "a", "simulator": True, "autoscaling": {"minReplicas": 0}}]},
        "/models/0/autoscaling/minReplicas",
    ),
    ({"gateway": {"securityContext": {"privileged": "yes"}}}, "/gateway/securityContext/privileged"),
    ({"gateway": {"podSecurityContext": {"runAsUser": -1}}}, "/gateway/podSecurityContext/runAsUser"),
    ({"gateway": {"podSecurityContext": {"runAsUsr": 5}}}, "runAsUsr"),
    (
        {"workerDefaults": {"podSecurityContext": {"seccompProfile": {"type": "runtime/default"}}}},
        "/workerDefaults/podSecurityContext/seccompProfile/type",
    ),
    (
        {"workerDefaults": {"securityContext": {"capabilities": {"drop": "ALL"}}}},
        "/workerDefaults/securityContext/capabilities/drop",
    ),
    (
        {"models": [{"name": "a", "simulator": True, "securityContext": {"readOnlyRootFilesystem": "true"}}]},
        "/models/0/securityContext/readOnlyRootFilesystem",
    ),
    ({"models": [{"name": "a", "simulator": True, "podSecurityContext": {"fsgroup": 1}}]}, "fsgroup"),
    ({"namespaceOverride": "Serving_NS"}, "/namespaceOverride"),
    ({"namespaceOverride": "n" * 64}, "/namespaceOverride"),
    ({"namespaceOverride": 7}, "/namespaceOverride"),
    ({"image": {"digest": "sha256:abc"}}, "/image/digest"),
    ({"workerDefaults": {"image": {"digest": "latest"}}}, "/workerDefaults/image/digest"),
    (
        {"models": [{"name": "a", "simulator": True, "image": {"digest": "sha256:" + "AB" * 32}}]},
        "/models/0/image/digest",
    ),
    ({"image": {"digest": "md5:" + "0" * 32}}, "/image/digest"),
]


@pytest.mark.parametrize(("values", "field"), BAD_VALUES, ids=[field for _, field in BAD_VALUES])
def test_schema_rejects_bad_values_naming_the_field(values: Obj, field: str) -> None:
    with pytest.raises(helm.HelmValuesError) as caught:
        render(values)
    assert field in str(caught.value)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"models": [{"name": "a", "simulator": True}, {"name": "a", "simulator": True}]}, "used twice"),
        ({"models": [{"name": "a"}]}, "source.huggingFace.id or source.pvc.claimName"),
        ({"models": [{"name": "a", "simulator": True, "cache": {"type": "pvc"}}]}, "cache.claimName is required"),
        ({"ingress": {"enabled": True, "tls": {"enabled": True}}}, "ingress.tls.secretName"),
        # a label the selectors use, replaced: discovery would find no worker
        ({"commonLabels": {"app.kubernetes.io/part-of": "ml-platform"}}, "app.kubernetes.io/part-of is set by the"),
        ({"commonLabels": {"team": "a", "app.kubernetes.io/instance": "x"}}, "app.kubernetes.io/instance is set by"),
        # the simulator takes one --served-model-name: a second name would never be served
        ({"models": [{"name": "a", "simulator": True, "servedNames": ["a", "b"]}]}, "a simulator serves one name"),
        # vLLM fails to start on an adapter path it cannot read
        (
            {
                "models": [
                    {
                        "name": "a",
                        "source": {"huggingFace": {"id": "x/y"}},
                        "loras": [{"name": "l", "source": "/models/l"}],
                    }
                ]
            },
            "the LoRA l is at /models/l, which no volume of the worker holds (mounted: none)",
        ),
        (
            {
                "models": [
                    {
                        "name": "a",
                        "source": {"huggingFace": {"id": "x/y"}},
                        "loras": [{"name": "l", "source": "/adaptersx/l"}],
                        "extraVolumes": [{"name": "ad", "emptyDir": {}}],
                        "extraVolumeMounts": [{"name": "ad", "mountPath": "/adapters"}],
                    }
                ]
            },
            "(mounted: /adapters)",
        ),
    ],
)
def test_inconsistent_values_fail_with_a_message(values: Obj, message: str) -> None:
    with pytest.raises(helm.HelmError) as caught:
        render(values)
    assert message in str(caught.value)


LONG_RELEASE = "a-very-long-release-name-that-goes-on-and-on-and-on"  # 51 chars: Helm allows 53


@pytest.mark.parametrize("model", ["on", "off", "yes", "no", "y", "n", "true", "null"])
def test_model_names_yaml_reads_as_booleans_stay_strings(model: str) -> None:
    objects = render({"models": [{"name": model, "simulator": True}]})
    for obj in objects:
        if "switchyard.dev/model" in obj["metadata"]["labels"]:
            assert obj["metadata"]["labels"]["switchyard.dev/model"] == model
        if obj["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(obj, K8S_VERSIONS[0], strict=True)
    (deployment,) = workers(objects)
    assert deployment["spec"]["selector"]["matchLabels"]["switchyard.dev/model"] == model


def test_long_release_names_stay_within_63_characters() -> None:
    values: dict[str, Any] = {"models": [{"name": "a-rather-long-model-name-of-forty-chars", "simulator": True}]}
    for extra in ({}, _everything_on()):
        objects = render({**extra, **values}, release=LONG_RELEASE)
        names = [obj["metadata"]["name"] for obj in objects]
        assert all(len(name) <= 63 and not name.endswith("-") for name in names), names
        assert len({(obj["kind"], obj["metadata"]["name"]) for obj in objects}) == len(objects)


def _everything_on() -> Obj:
    """Every optional object of both components: monitors, autoscalers, NetworkPolicy, Ingress, HTTPRoute."""
    values = load_values(CHART / "ci" / "monitoring-values.yaml")
    values["ingress"] = {"enabled": True}
    values["httpRoute"] = {"enabled": True, "parentRefs": [{"name": "public"}]}
    return values


@pytest.mark.parametrize(
    ("release", "values", "fullname"),
    [
        (RELEASE, {}, f"{RELEASE}-switchyard"),
        ("switchyard-prod", {}, "switchyard-prod"),  # the release already holds the chart name
        (RELEASE, {"fullnameOverride": "llm"}, "llm"),
        (RELEASE, {"nameOverride": "yard"}, f"{RELEASE}-yard"),
        (LONG_RELEASE, {}, f"{LONG_RELEASE}-switchyard"),
    ],
    ids=["release", "release-holds-chart-name", "fullnameOverride", "nameOverride", "long-release"],
)
def test_one_naming_scheme_per_component(release: str, values: Obj, fullname: str) -> None:
    objects = render({**_everything_on(), **values}, release=release)
    gateway_name = f"{fullname[:55].rstrip('-')}-gateway"
    components: dict[str, set[str]] = {}
    for obj in objects:
        labels, name = obj["metadata"]["labels"], obj["metadata"]["name"]
        component = labels.get("app.kubernetes.io/component", "")
        components.setdefault(component, set()).add(obj["kind"])
        if component == "gateway":
            assert name == gateway_name, (obj["kind"], name)
        elif component == "worker":
            model = labels.get("switchyard.dev/model", "workers")  # NetworkPolicy, PodMonitor: every worker
            assert name == f"{fullname[:40].rstrip('-')}-{model}"[:63].rstrip("-"), (obj["kind"], name)
    assert components["gateway"] == {
        "Deployment",
        "Service",
        "ConfigMap",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "Ingress",
        "HTTPRoute",
        "ServiceMonitor",
    }
    assert components["worker"] == {"Deployment", "Service", "ScaledObject", "NetworkPolicy", "PodMonitor"}
    # What points at the gateway Service uses the same name.
    (ingress,) = of_kind(objects, "Ingress")
    assert ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] == gateway_name
    (route,) = of_kind(objects, "HTTPRoute")
    assert route["spec"]["rules"][0]["backendRefs"][0]["name"] == gateway_name
    (test_pod,) = of_kind(objects, "Pod")
    assert f"http://{gateway_name}:80/v1/models" in test_pod["spec"]["containers"][0]["args"][0]
    for role_ref in (o["roleRef"]["name"] for o in of_kind(objects, "RoleBinding")):
        assert role_ref == gateway_name


def test_namespace_override_moves_every_object_and_what_points_at_the_namespace() -> None:
    override = "llm"
    assert override != NAMESPACE
    values = {**_everything_on(), "namespaceOverride": override}
    objects = render(values)
    assert {obj["metadata"]["namespace"] for obj in objects} == {override}  # every kind of the chart is namespaced
    assert _gateway_config(objects)["kubernetes"]["namespaces"] == [override]  # discovery watches the workers there
    (binding,) = of_kind(objects, "RoleBinding")
    assert binding["subjects"][0]["namespace"] == override
    for kind in ("ServiceMonitor", "PodMonitor"):
        (monitor,) = of_kind(objects, kind)
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": [override]}
    (scaled,) = of_kind(objects, "ScaledObject")
    assert f'namespace="{override}"' in scaled["spec"]["triggers"][0]["metadata"]["query"]
    for version in K8S_VERSIONS:
        for obj in objects:
            if obj["kind"] not in CRD_KINDS:
                kubernetes_validate.validate(obj, version, strict=True)
    text = notes(values)
    assert f"kubectl port-forward -n {override} svc/" in text
    assert f"kubectl get pods -n {override} " in text
    assert f"helm test {RELEASE} -n {NAMESPACE}" in text  # the release itself stays in the release namespace
    # unset or empty: the release namespace
    for unset in ({}, {"namespaceOverride": ""}):
        objects = render({**_everything_on(), **unset})
        assert {obj["metadata"]["namespace"] for obj in objects} == {NAMESPACE}
        assert _gateway_config(objects)["kubernetes"]["namespaces"] == [NAMESPACE]


def test_gateway_down_alert_matches_the_job_the_service_monitor_scrapes() -> None:
    """The Prometheus Operator names a ServiceMonitor's job after the Service it scrapes; the shipped alert
    selects gateway jobs by name, so the gateway Service's name must match it (it did not when the Service was
    "<release>-switchyard": the alert would have fired forever)."""
    shipped = yaml.safe_load((CHART / "alerts" / "switchyard.yaml").read_text())
    (expr,) = [r["expr"] for g in shipped["groups"] for r in g["rules"] if r["alert"] == "SwitchyardGatewayDown"]
    (pattern,) = set(re.findall(r'up\{job=~"([^"]+)"\}', expr))
    for release in (RELEASE, "prod", "switchyard", "switchyard-prod"):
        objects = render(load_values(CHART / "ci" / "monitoring-values.yaml"), release=release)
        (monitor,) = of_kind(objects, "ServiceMonitor")
        assert "jobLabel" not in monitor["spec"]
        (service,) = [
            s
            for s in of_kind(objects, "Service")
            if s["spec"]["selector"] == monitor["spec"]["selector"]["matchLabels"]
        ]
        assert re.fullmatch(pattern, service["metadata"]["name"]), (release, service["metadata"]["name"], pattern)


def test_the_gateway_lets_streams_finish_within_the_pods_termination_budget(tmp_path: Path) -> None:
    """SIGTERM reaches the gateway after the preStop sleep; what is left of terminationGracePeriodSeconds (less
    5 s to exit) is its grace period for streams in flight, not the gateway's own 30 s default."""

    def grace(values: Obj) -> float:
        path = tmp_path / "config.yaml"
        path.write_text(_gateway_config_text(render(values)))
        return load_settings(path).shutdown.grace_period

    assert grace({}) == 60 - 5 - 5
    assert grace({"gateway": {"terminationGracePeriodSeconds": 900}}) == 890
    assert grace({"gateway": {"terminationGracePeriodSeconds": 900, "preStopSleepSeconds": 0}}) == 895
    assert grace({"gateway": {"terminationGracePeriodSeconds": 3}}) == 1
    assert grace({"gateway": {"config": {"shutdown": {"grace_period": 12.5}}}}) == 12.5
    drain = {"gateway": {"config": {"shutdown": {"drain_delay": 2}}}}
    assert grace(drain) == 50


def test_the_gateway_down_alert_selects_this_releases_gateway_job() -> None:
    """With fullnameOverride or nameOverride the gateway Service (the ServiceMonitor's job) may not contain
    "switchyard": the rendered alert names the job exactly, so it neither fires forever nor misses an outage."""
    for values in ({"fullnameOverride": "llm"}, {"nameOverride": "gw"}, {}):
        objects = render({**load_values(CHART / "ci" / "monitoring-values.yaml"), **values})
        (monitor,) = of_kind(objects, "ServiceMonitor")
        (service,) = [
            s
            for s in of_kind(objects, "Service")
            if s["spec"]["selector"] == monitor["spec"]["selector"]["matchLabels"]
        ]
        (rule,) = of_kind(objects, "PrometheusRule")
        (expr,) = [
            r["expr"] for g in rule["spec"]["groups"] for r in g["rules"] if r["alert"] == "SwitchyardGatewayDown"
        ]
        selector = f'up{{job="{service["metadata"]["name"]}", namespace="{NAMESPACE}"}}'
        assert expr.count(selector) == 2, expr
        assert "=~" not in expr


def test_simulators_take_their_own_vllm_args_only() -> None:
    """workerDefaults.vllmArgs are vLLM's flags (the simulator would exit on --gpu-memory-utilization); a
    simulator entry's own vllmArgs still reach it, and real workers still get the defaults."""
    objects = render(
        {
            "workerDefaults": {"vllmArgs": ["--gpu-memory-utilization", "0.92"]},
            "models": [
                {"name": "sim", "simulator": True, "vllmArgs": ["--seed", "3"]},
                {"name": "plain-sim", "simulator": True},
                {"name": "real", "source": {"huggingFace": {"id": "x/y"}}},
            ],
        }
    )
    args = {d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]["args"] for d in workers(objects)}
    assert args[f"{RELEASE}-switchyard-sim"][-2:] == ["--seed", "3"]
    assert "--gpu-memory-utilization" not in args[f"{RELEASE}-switchyard-sim"]
    assert "--gpu-memory-utilization" not in args[f"{RELEASE}-switchyard-plain-sim"]
    assert args[f"{RELEASE}-switchyard-real"][-2:] == ["--gpu-memory-utilization", "0.92"]


def test_extra_volumes_numeric_cpu_and_the_test_pods_key() -> None:
    """A Secret of API keys mounted for auth.keys_file, a CPU request written as a number, and `helm test`
    sending a key when the gateway requires one."""
    keys = {"name": "keys", "secret": {"secretName": "gateway-keys"}}
    mount = {"name": "keys", "mountPath": "/etc/switchyard-keys", "readOnly": True}
    objects = render(
        {
            "gateway": {
                "extraVolumes": [keys],
                "extraVolumeMounts": [mount],
                "resources": {"requests": {"cpu": 0.5}},
                "config": {"auth": {"keys_file": "/etc/switchyard-keys/keys.yaml"}},
            },
            "tests": {"apiKey": {"existingSecret": "test-key"}},
        }
    )
    for obj in objects:
        if obj["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(obj, K8S_VERSIONS[0], strict=True)
    pod = named(objects, "Deployment", f"{RELEASE}-switchyard-gateway")["spec"]["template"]["spec"]
    assert keys in pod["volumes"]
    assert mount in pod["containers"][0]["volumeMounts"]
    test = of_kind(objects, "Pod")[0]["spec"]["containers"][0]
    assert test["env"] == [
        {"name": "SWITCHYARD_TEST_API_KEY", "valueFrom": {"secretKeyRef": {"name": "test-key", "key": "api-key"}}}
    ]
    assert "Authorization" in test["args"][0]
    assert "env" not in of_kind(render({}), "Pod")[0]["spec"]["containers"][0]
