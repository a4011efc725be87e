"""OpenTelemetry tracing from the chart: `tracing.*` values become the gateway's `tracing: {enabled: true}` and its
OTEL_* env, and each vLLM worker's --otlp-traces-endpoint and OTEL_* env; off (the default) renders none of it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import helm_python as helm
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider

from gateway.settings import load_settings
from tests.helm.chart import CHART, CI_VALUES, CRD_KINDS, RELEASE, Obj, load_values, named, pod_specs, render, workers

GATEWAY = f"{RELEASE}-switchyard-gateway"
COLLECTOR = "http://otel-collector.observability:4318"
PVC = {"pvc": {"claimName": "models"}}
REAL_AND_SIM: list[Obj] = [
    {"name": "chat", "source": PVC, "vllmArgs": ["--max-model-len", "8192"]},
    {"name": "embed", "source": {"huggingFace": {"id": "org/embed", "revision": "abc123"}}},
    {"name": "sim", "simulator": True},
]

CI_OFF = [path for path in CI_VALUES if not load_values(path).get("tracing", {}).get("enabled")]
CI_TRACING = CHART / "ci" / "tracing-values.yaml"


def _on(**tracing: object) -> Obj:
    return {"tracing": {"enabled": True, "endpoint": COLLECTOR, **tracing}, "models": REAL_AND_SIM}


def _container(objects: list[Obj], name: str) -> Obj:
    container: Obj = named(objects, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]
    return container


def _env(container: Obj) -> dict[str, str]:
    names = [e["name"] for e in container.get("env", [])]
    assert len(names) == len(set(names)), f"duplicate env names in {container['name']}: {names}"
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def _otel(container: Obj) -> dict[str, str]:
    return {name: value for name, value in _env(container).items() if name.startswith("OTEL_")}


def _vllm_args(container: Obj) -> list[str]:
    """What the worker launcher passes to vLLM unchanged: everything after `--`."""
    args: list[str] = container["args"]
    return args[args.index("--") + 1 :] if "--" in args else []


def _config(objects: list[Obj]) -> Obj:
    config: Obj = yaml.safe_load(named(objects, "ConfigMap", GATEWAY)["data"]["config.yaml"])
    return config


def _validate(objects: list[Obj]) -> None:
    for obj in objects:
        if obj["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(obj, "1.31.0", strict=True)


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"models": REAL_AND_SIM},
        {"tracing": {"endpoint": COLLECTOR, "sampler": "always_on"}, "models": REAL_AND_SIM},  # set up, not enabled
        *(load_values(path) for path in CI_OFF),
    ],
    ids=["defaults", "real-workers", "endpoint-but-off", *(path.stem for path in CI_OFF)],
)
def test_off_renders_no_tracing(values: Obj) -> None:
    objects = render(values)
    assert "tracing" not in _config(objects)
    for name, spec in pod_specs(objects):
        for container in spec["containers"]:
            assert not [e for e in container.get("env", []) if e["name"].startswith("OTEL_")], name
            assert not [a for a in container.get("args", []) if "otlp" in str(a)], name


def test_gateway_config_and_env(tmp_path: Path) -> None:
    objects = render(_on())
    assert _config(objects)["tracing"] == {"enabled": True}
    path = tmp_path / "config.yaml"
    path.write_text(named(objects, "ConfigMap", GATEWAY)["data"]["config.yaml"])
    assert load_settings(path).tracing.enabled is True
    assert _otel(_container(objects, GATEWAY)) == {
        "OTEL_EXPORTER_OTLP_ENDPOINT": COLLECTOR,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_SERVICE_NAME": GATEWAY,
    }
    _validate(objects)


def test_the_gateway_env_is_what_the_otel_sdk_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    values = _on(sampler="parentbased_traceidratio", samplerArg=0.25)
    values["tracing"]["endpoint"] = COLLECTOR + "/"  # a trailing slash is dropped
    env = _otel(_container(render(values), GATEWAY))
    assert env["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
    assert env["OTEL_TRACES_SAMPLER_ARG"] == "0.25"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert OTLPSpanExporter()._endpoint == f"{COLLECTOR}/v1/traces"
    assert Resource.create().attributes[SERVICE_NAME] == GATEWAY
    assert TracerProvider().sampler.get_description().startswith("ParentBased{root:TraceIdRatioBased{0.25}")


def test_the_service_name_follows_the_release() -> None:
    gateway = _container(render(_on(), release="switchyard"), "switchyard-gateway")
    assert _otel(gateway)["OTEL_SERVICE_NAME"] == "switchyard-gateway"


def test_gateway_config_tracing_wins() -> None:
    objects = render({**_on(), "gateway": {"config": {"tracing": {"enabled": False}, "model_refresh_interval": 9}}})
    config = _config(objects)
    assert config["tracing"] == {"enabled": False}
    assert config["model_refresh_interval"] == 9
    # gateway.config may also turn tracing on by itself, as before: the chart then adds no env
    objects = render({"gateway": {"config": {"tracing": {"enabled": True}}}})
    assert _config(objects)["tracing"] == {"enabled": True}
    assert _otel(_container(objects, GATEWAY)) == {}


def test_workers_export_vllm_spans_over_http() -> None:
    objects = render(_on(samplerArg="0.1", sampler="traceidratio"))
    chat, embed = _container(objects, f"{RELEASE}-switchyard-chat"), _container(objects, f"{RELEASE}-switchyard-embed")
    # vLLM's http/protobuf exporter takes the URL as it is: the chart appends the traces path
    assert _vllm_args(chat) == ["--otlp-traces-endpoint", f"{COLLECTOR}/v1/traces", "--max-model-len", "8192"]
    assert _vllm_args(embed) == ["--revision", "abc123", "--otlp-traces-endpoint", f"{COLLECTOR}/v1/traces"]
    for container, model in ((chat, "chat"), (embed, "embed")):
        assert _otel(container) == {
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",  # vLLM's default would be grpc
            "OTEL_SERVICE_NAME": model,
            "OTEL_TRACES_SAMPLER": "traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.1",
        }
        assert _env(container)["HF_HOME"] == "/cache/huggingface"  # the chart's own env is still there
    _validate(objects)


def test_workers_over_grpc_get_the_endpoint_as_it_is() -> None:
    endpoint = "http://otel-collector.observability:4317"
    objects = render({**_on(), "tracing": {"enabled": True, "endpoint": endpoint, "protocol": "grpc"}})
    assert _otel(_container(objects, GATEWAY))["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc"
    chat = _container(objects, f"{RELEASE}-switchyard-chat")
    assert _vllm_args(chat)[:2] == ["--otlp-traces-endpoint", endpoint]
    assert _otel(chat)["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] == "grpc"


def test_simulators_and_workers_false_get_nothing() -> None:
    objects = render(_on())
    sim = _container(objects, f"{RELEASE}-switchyard-sim")
    assert _otel(sim) == {}
    assert not [a for a in sim["args"] if "otlp" in a]  # the simulator has no such flag
    objects = render({**_on(), "tracing": {"enabled": True, "endpoint": COLLECTOR, "workers": False}})
    assert _otel(_container(objects, GATEWAY))["OTEL_EXPORTER_OTLP_ENDPOINT"] == COLLECTOR
    for deployment in workers(objects):
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert _otel(container) == {}
        assert not [a for a in container["args"] if "otlp" in a]
    # without tracing nor vllmArgs nor a revision the launcher gets no `--` at all, as before
    plain = _container(render({"models": [{"name": "chat", "source": PVC}]}), f"{RELEASE}-switchyard-chat")
    assert "--" not in plain["args"]


def test_env_the_user_sets_wins_over_the_charts() -> None:
    values = _on()
    values["gateway"] = {"extraEnv": [{"name": "OTEL_SERVICE_NAME", "value": "edge"}]}
    values["models"] = [{"name": "chat", "source": PVC, "env": [{"name": "OTEL_SERVICE_NAME", "value": "llama"}]}]
    objects = render(values)  # _env asserts each name appears once
    assert _otel(_container(objects, GATEWAY))["OTEL_SERVICE_NAME"] == "edge"
    chat = _container(objects, f"{RELEASE}-switchyard-chat")
    assert _otel(chat) == {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf", "OTEL_SERVICE_NAME": "llama"}


def test_the_config_checksum_rolls_the_gateway_when_tracing_turns_on() -> None:
    def checksum(values: Obj) -> str:
        annotations = named(render(values), "Deployment", GATEWAY)["spec"]["template"]["metadata"]["annotations"]
        value: str = annotations["checksum/config"]
        return value

    assert checksum({}) != checksum(_on())


@pytest.mark.parametrize(
    ("tracing", "message"),
    [
        ({"enabled": True}, "tracing.enabled is true but tracing.endpoint is empty"),
        ({"enabled": True, "endpoint": ""}, "tracing.endpoint is empty"),
        ({"enabled": True, "endpoint": COLLECTOR, "samplerArg": 0.1}, "tracing.samplerArg is set but tracing.sampler"),
    ],
)
def test_inconsistent_tracing_values_fail_with_a_message(tracing: Obj, message: str) -> None:
    with pytest.raises(helm.HelmError) as caught:
        render({"tracing": tracing})
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("tracing", "field"),
    [
        ({"enabled": "true"}, "/tracing/enabled"),
        ({"protocol": "http"}, "/tracing/protocol"),
        ({"endpoint": "otel-collector:4318"}, "/tracing/endpoint"),
        ({"sampler": "ratio"}, "/tracing/sampler"),
        ({"samplerArg": True}, "/tracing/samplerArg"),
        ({"workers": "yes"}, "/tracing/workers"),
        ({"serviceName": "x"}, "serviceName"),
    ],
)
def test_schema_rejects_bad_tracing_values(tracing: Obj, field: str) -> None:
    with pytest.raises(helm.HelmValuesError) as caught:
        render({"tracing": tracing})
    assert field in str(caught.value)


def test_the_ci_tracing_values_trace_the_gateway_and_the_vllm_worker() -> None:
    assert CI_TRACING in CI_VALUES  # so test_chart.py lints it and validates its objects too
    assert CI_TRACING not in CI_OFF
    objects = render(load_values(CI_TRACING))
    assert _config(objects)["tracing"] == {"enabled": True}
    assert _otel(_container(objects, GATEWAY))["OTEL_TRACES_SAMPLER_ARG"] == "0.1"
    llama = _container(objects, f"{RELEASE}-switchyard-llama-8b")
    assert _vllm_args(llama) == [
        "--revision",
        "main",
        "--otlp-traces-endpoint",
        "http://otel-collector.observability:4318/v1/traces",
        "--max-model-len",
        "8192",
    ]
    assert _otel(llama)["OTEL_SERVICE_NAME"] == "llama-8b"
    assert _otel(_container(objects, f"{RELEASE}-switchyard-demo")) == {}


def test_lint_is_clean_with_tracing_on() -> None:
    report = helm.lint(str(CHART), _on(sampler="parentbased_traceidratio", samplerArg="0.1"), strict=True)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (the cpu extra)")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's, on importing vLLM
def test_vllm_reads_what_the_chart_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker launcher hands the flag to vLLM; vLLM's own parser and exporter take it and the env."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.tracing.otel import get_span_exporter
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from worker.launcher import parse_settings
    from worker.vllm_args import build_vllm_argv

    chat = _container(render(_on()), f"{RELEASE}-switchyard-chat")
    env = {**_env(chat), "SWITCHYARD_WORKER_ENGINE": "gpu"}
    settings = parse_settings(chat["args"], env)
    argv = build_vllm_argv(settings.options, settings.engine, settings.python)
    engine_args, _ = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser()).parse_known_args(argv)
    assert engine_args.otlp_traces_endpoint == f"{COLLECTOR}/v1/traces"
    for name, value in _otel(chat).items():
        monkeypatch.setenv(name, value)
    exporter = get_span_exporter(engine_args.otlp_traces_endpoint)
    assert isinstance(exporter, OTLPSpanExporter)
    assert exporter._endpoint == f"{COLLECTOR}/v1/traces"
