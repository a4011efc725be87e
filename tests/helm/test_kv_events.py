"""KV cache events on the workers: ports the gateway discovers by name, the worker launcher's and the
simulator's options, and the NetworkPolicy that lets the gateway reach the sockets."""

from __future__ import annotations

import json
from typing import Any

import helm_python as helm
import kubernetes_validate  # type: ignore[import-untyped]
import pytest

from gateway.settings import KubernetesSettings
from tests.helm.chart import CRD_KINDS, RELEASE, Obj, named, of_kind, render, workers

# The contract with the gateway's EndpointSlice discovery (settings kubernetes.kv_events_port_name and
# kubernetes.kv_replay_port_name) and with vLLM's defaults.
KV_EVENTS, KV_REPLAY = "kv-events", "kv-replay"
DEFAULT_PORTS = {"http": 8000, KV_EVENTS: 5557, KV_REPLAY: 5558}
SIM_COMMAND = ["python", "-m", "worker.sim"]
PVC = {"pvc": {"claimName": "models"}}


def _container(objects: list[Obj], model: str) -> Obj:
    container: Obj = named(objects, "Deployment", f"{RELEASE}-switchyard-{model}")["spec"]["template"]["spec"][
        "containers"
    ][0]
    return container


def _container_ports(objects: list[Obj], model: str) -> dict[str, int]:
    return {port["name"]: port["containerPort"] for port in _container(objects, model)["ports"]}


def _service_ports(objects: list[Obj], model: str) -> dict[str, int]:
    service = named(objects, "Service", f"{RELEASE}-switchyard-{model}")
    for port in service["spec"]["ports"]:
        assert port["targetPort"] == port["name"]  # resolved against the container port of the same name
        assert port["protocol"] == "TCP"
    return {port["name"]: port["port"] for port in service["spec"]["ports"]}


def _launcher_options(args: list[str]) -> list[str]:
    """The launcher's own options: everything before `--` (after it, arguments go to vLLM unchanged)."""
    return args[: args.index("--")] if "--" in args else args


def _option(args: list[str], name: str) -> str:
    assert args.count(name) == 1, (name, args)
    return args[args.index(name) + 1]


def _kv_events_config(args: list[str]) -> Any:
    return json.loads(_option(args, "--kv-events-config"))


def _validate(objects: list[Obj]) -> None:
    for obj in objects:
        if obj["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(obj, "1.31.0", strict=True)


def test_the_port_names_are_the_ones_the_gateway_reads() -> None:
    fields = KubernetesSettings.model_fields
    if "kv_events_port_name" not in fields or "kv_replay_port_name" not in fields:
        pytest.skip("the gateway's settings have no kv_events_port_name / kv_replay_port_name yet")
    assert fields["kv_events_port_name"].default == KV_EVENTS
    assert fields["kv_replay_port_name"].default == KV_REPLAY


def test_workers_declare_the_kv_ports_by_default() -> None:
    objects = render({"models": [{"name": "real", "source": PVC}, {"name": "sim", "simulator": True}]})
    for model in ("real", "sim"):
        assert _container_ports(objects, model) == DEFAULT_PORTS
        assert _service_ports(objects, model) == DEFAULT_PORTS
    _validate(objects)


def test_launcher_options_from_values() -> None:
    values: Obj = {
        "models": [
            {"name": "default", "source": PVC, "vllmArgs": ["--max-model-len", "4096"]},
            {"name": "ports", "source": PVC, "kvEvents": {"port": 6000, "replayPort": 6001}},
            {"name": "off", "source": PVC, "kvEvents": {"enabled": False}, "promptTokensDetails": False},
        ]
    }
    objects = render(values)
    default = _container(objects, "default")["args"]
    options = _launcher_options(default)
    assert _option(options, "--kv-events") == "on"
    assert _option(options, "--kv-events-port") == "5557"
    assert _option(options, "--kv-replay-port") == "5558"
    assert _option(options, "--prompt-tokens-details") == "on"
    assert default[default.index("--") + 1 :] == ["--max-model-len", "4096"]  # vLLM's own arguments stay last

    ports = _launcher_options(_container(objects, "ports")["args"])
    assert (_option(ports, "--kv-events-port"), _option(ports, "--kv-replay-port")) == ("6000", "6001")
    expected = {"http": 8000, KV_EVENTS: 6000, KV_REPLAY: 6001}
    assert _container_ports(objects, "ports") == _service_ports(objects, "ports") == expected

    off = _container(objects, "off")["args"]
    assert _option(off, "--kv-events") == "off"
    assert _option(off, "--prompt-tokens-details") == "off"
    assert "--kv-events-port" not in off
    assert "--kv-replay-port" not in off
    # disabled: the ports are not declared, so discovery finds no KV endpoint for this worker
    assert _container_ports(objects, "off") == _service_ports(objects, "off") == {"http": 8000}
    _validate(objects)


def test_simulator_gets_vllms_own_flags() -> None:
    values: Obj = {
        "models": [
            {"name": "sim", "simulator": True, "vllmArgs": ["--seed", "7"]},
            {"name": "sim-ports", "simulator": True, "port": 9000, "kvEvents": {"port": 7000, "replayPort": 7001}},
            {"name": "sim-off", "simulator": True, "kvEvents": {"enabled": False}, "promptTokensDetails": False},
        ]
    }
    objects = render(values)
    sim = _container(objects, "sim")
    assert sim["command"] == SIM_COMMAND
    args = sim["args"]
    assert "--enable-prefix-caching" in args
    assert "--enable-prompt-tokens-details" in args
    assert _kv_events_config(args) == {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": "tcp://*:5557",
        "replay_endpoint": "tcp://*:5558",
    }
    assert args[-2:] == ["--seed", "7"]
    assert not {"--kv-events", "--kv-events-port", "--prompt-tokens-details"} & set(args)  # launcher-only options

    ports = _container(objects, "sim-ports")["args"]
    assert _kv_events_config(ports)["endpoint"] == "tcp://*:7000"
    assert _kv_events_config(ports)["replay_endpoint"] == "tcp://*:7001"
    expected = {"http": 9000, KV_EVENTS: 7000, KV_REPLAY: 7001}
    assert _container_ports(objects, "sim-ports") == _service_ports(objects, "sim-ports") == expected

    off = _container(objects, "sim-off")["args"]
    assert not {"--enable-prefix-caching", "--kv-events-config", "--enable-prompt-tokens-details"} & set(off)
    assert _container_ports(objects, "sim-off") == _service_ports(objects, "sim-off") == {"http": 8000}
    _validate(objects)


def test_worker_defaults_apply_to_every_model_and_a_model_overrides_them() -> None:
    values: Obj = {
        "workerDefaults": {"kvEvents": {"enabled": False}, "promptTokensDetails": False},
        "models": [
            {"name": "a", "source": PVC},
            {"name": "b", "source": PVC, "kvEvents": {"enabled": True}, "promptTokensDetails": True},
            {"name": "c", "simulator": True},
        ],
    }
    objects = render(values)
    a, b = _container(objects, "a")["args"], _container(objects, "b")["args"]
    assert (_option(a, "--kv-events"), _option(a, "--prompt-tokens-details")) == ("off", "off")
    assert (_option(b, "--kv-events"), _option(b, "--prompt-tokens-details")) == ("on", "on")
    assert (_option(b, "--kv-events-port"), _option(b, "--kv-replay-port")) == ("5557", "5558")  # defaults kept
    assert _container_ports(objects, "a") == {"http": 8000}
    assert _container_ports(objects, "b") == DEFAULT_PORTS
    assert "--kv-events-config" not in _container(objects, "c")["args"]


def test_network_policy_lets_the_gateway_reach_the_kv_sockets() -> None:
    values: Obj = {"networkPolicy": {"enabled": True}, "models": [{"name": "sim", "simulator": True}]}
    objects = render(values)
    (policy,) = of_kind(objects, "NetworkPolicy")
    gateway = named(objects, "Deployment", f"{RELEASE}-switchyard-gateway")["spec"]["selector"]["matchLabels"]
    worker_labels = workers(objects)[0]["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= worker_labels.items()

    def allowed(peer: Obj) -> set[str]:
        """Port names that peer may reach."""
        return {
            str(port["port"]) for rule in policy["spec"]["ingress"] if peer in rule["from"] for port in rule["ports"]
        }

    assert allowed({"podSelector": {"matchLabels": gateway}}) == {"http", KV_EVENTS, KV_REPLAY}
    prometheus = next(
        peer for rule in policy["spec"]["ingress"] for peer in rule["from"] if "namespaceSelector" in peer
    )
    assert allowed(prometheus) == {"http"}  # /metrics only, not the event sockets
    # the named ports in the policy are the ones the worker container declares
    declared = set(_container_ports(objects, "sim"))
    assert {str(port["port"]) for rule in policy["spec"]["ingress"] for port in rule["ports"]} <= declared
    _validate(objects)

    values["workerDefaults"] = {"kvEvents": {"enabled": False}}
    (policy,) = of_kind(render(values), "NetworkPolicy")
    assert allowed({"podSelector": {"matchLabels": gateway}}) == {"http"}


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"workerDefaults": {"kvEvents": {"port": 0}}}, "/workerDefaults/kvEvents/port"),
        ({"workerDefaults": {"kvEvents": {"replayPort": 70000}}}, "/workerDefaults/kvEvents/replayPort"),
        ({"workerDefaults": {"kvEvents": {"enable": True}}}, "enable"),
        ({"workerDefaults": {"kvEvents": {"port": "5557"}}}, "/workerDefaults/kvEvents/port"),
        ({"workerDefaults": {"promptTokensDetails": "on"}}, "/workerDefaults/promptTokensDetails"),
        ({"models": [{"name": "a", "simulator": True, "kvEvents": {"enabled": "yes"}}]}, "/models/0/kvEvents/enabled"),
        ({"models": [{"name": "a", "simulator": True, "promptTokensDetails": 1}]}, "/models/0/promptTokensDetails"),
    ],
)
def test_schema_rejects_bad_kv_values_naming_the_field(values: Obj, field: str) -> None:
    with pytest.raises(helm.HelmValuesError) as caught:
        render(values)
    assert field in str(caught.value)


@pytest.mark.parametrize(
    "model",
    [
        {"port": 5557},
        {"kvEvents": {"replayPort": 8000}},
        {"kvEvents": {"port": 6000, "replayPort": 6000}},
    ],
    ids=["api-port-is-the-events-port", "api-port-is-the-replay-port", "events-port-is-the-replay-port"],
)
def test_clashing_ports_fail_naming_the_model(model: Obj) -> None:
    with pytest.raises(helm.HelmError) as caught:
        render({"models": [{"name": "clash", "simulator": True, **model}]})
    assert "models[clash]: port" in str(caught.value)
    assert "must all differ" in str(caught.value)
    # the same ports with the events off are fine: nothing else listens there
    render({"models": [{"name": "clash", "simulator": True, **model, "kvEvents": {"enabled": False}}]})


# The launcher and the simulator are being extended to take these options; until they do, these two skip,
# then they check that what the chart passes is what they parse.


def test_the_worker_launcher_parses_the_chart_arguments() -> None:
    from worker.launcher import _parser, parse_settings

    if "--kv-events" not in _parser({}).format_help():
        pytest.skip("the worker launcher has no --kv-events option yet")
    values: Obj = {
        "models": [
            {"name": "on", "source": PVC, "kvEvents": {"port": 6000, "replayPort": 6001}, "vllmArgs": ["--seed", "1"]},
            {"name": "off", "source": PVC, "kvEvents": {"enabled": False}, "promptTokensDetails": False},
        ]
    }
    objects = render(values)
    for model in ("on", "off"):
        container = _container(objects, model)
        env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        parse_settings(container["args"], env)  # ValueError or SystemExit on an argument it does not take


def test_the_simulator_parses_the_chart_arguments() -> None:
    from worker.sim.cli import build_parser

    parser = build_parser()
    if "--kv-events-config" not in parser.format_help():
        pytest.skip("the simulator has no --kv-events-config option yet")
    values: Obj = {
        "models": [
            {"name": "on", "simulator": True, "kvEvents": {"port": 7000, "replayPort": 7001}},
            {"name": "off", "simulator": True, "kvEvents": {"enabled": False}, "promptTokensDetails": False},
        ]
    }
    objects = render(values)
    for model in ("on", "off"):
        parser.parse_args(_container(objects, model)["args"])  # SystemExit on an argument it does not take
