"""KV cache events in `switchyard up`: each started vLLM worker gets its own two ports, an opt-out, fixed ports
from the stack file, and simulators get vLLM's own flags with them. The process tests run the real launcher with a
stand-in for vLLM that binds the ports it is given (tests/worker/replay_vllm.py); real vLLM publishes in tests/e2e."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from tests.worker.replay_vllm import replay_env
from worker.procs import free_port_block
from worker.sim.kv_events import parse_kv_events_config
from worker.stack import KvEventPorts, Stack, StackError, kv_event_ports, worker_argv
from worker.stack_file import GatewaySpec, StackFileError, StackSpec, WorkerSpec, demo_stack, parse_stack


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_vllm_workers_get_their_ports_and_the_opted_out_get_off() -> None:
    chat, embed = demo_stack(Path("/m")).workers
    assert chat.kv_events
    assert not embed.kv_events  # vLLM cannot prefix-cache the encoder-only embedding model
    argv = worker_argv(chat, sim=False, kv=KvEventPorts(21557, 21558))
    expected = ["--kv-events", "on", "--kv-events-port", "21557", "--kv-replay-port", "21558"]
    assert argv[argv.index("--kv-events") :][:6] == expected
    assert _flag(worker_argv(embed, sim=False), "--kv-events") == "off"


def test_simulators_get_vllms_own_flags_with_their_ports() -> None:
    chat = demo_stack(Path("/m")).workers[0]
    argv = worker_argv(chat, sim=True, kv=KvEventPorts(21557, 21558))
    assert "--enable-prefix-caching" in argv
    assert "--enable-prompt-tokens-details" in argv
    config = parse_kv_events_config(_flag(argv, "--kv-events-config"))  # as the simulator reads it
    assert (config.endpoint, config.replay_endpoint) == ("tcp://*:21557", "tcp://*:21558")
    assert config.publishing
    assert "--kv-events-config" not in worker_argv(chat, sim=True)  # no ports: no events


def test_every_worker_gets_distinct_free_ports_and_explicit_ones_are_kept() -> None:
    base = free_port_block(4)
    spec = StackSpec(
        gateway=GatewaySpec(port=base),
        workers=[
            WorkerSpec(name="a", model="m", port=base + 1),
            WorkerSpec(name="b", model="m", port=base + 2, kv_events_port=base + 10, kv_replay_port=base + 11),
            WorkerSpec(name="c", model="m", port=base + 3, kv_events=False),
            WorkerSpec(name="remote", url="http://10.0.0.7:8000"),
        ],
    )
    ports = kv_event_ports(spec)
    assert set(ports) == {"a", "b"}
    assert ports["b"] == KvEventPorts(base + 10, base + 11)
    used = [ports["a"].events, ports["a"].replay, base + 10, base + 11, base, base + 1, base + 2, base + 3]
    assert len(set(used)) == len(used)


@pytest.mark.parametrize(
    ("worker", "message"),
    [
        ({"kv_events_port": 8001}, "ports must be unique"),  # the other worker's HTTP port
        ({"kv_events_port": 9000, "kv_replay_port": 9000}, "ports must be unique"),
        ({"kv_replay_port": 0}, "workers.0.kv_replay_port"),
    ],
)
def test_bad_kv_ports_in_a_stack_file_name_the_problem(worker: dict[str, object], message: str) -> None:
    data = {"workers": [{"name": "a", "model": "m", "port": 8002, **worker}, {"name": "b", "model": "m", "port": 8001}]}
    with pytest.raises(StackFileError, match=message):
        parse_stack(data, Path("/m"))


def test_an_opted_out_worker_may_keep_ports_it_does_not_use() -> None:
    data = {"workers": [{"name": "a", "model": "m", "port": 8002, "kv_events": False, "kv_events_port": 8001}]}
    data["workers"].append({"name": "b", "model": "m", "port": 8001})
    assert parse_stack(data, Path("/m")).workers[0].kv_events is False


def _argv_of(record: Path) -> list[str]:
    argv: list[str] = json.loads(record.read_text())
    return argv


def test_two_workers_on_one_machine_never_collide(tmp_path: Path) -> None:
    port = free_port_block(3)
    workers = [
        WorkerSpec(name=name, model=f"/m/{name}", port=port + i, env=replay_env(tmp_path / name))
        for i, name in ((1, "one"), (2, "two"))
    ]
    spec = StackSpec(gateway=GatewaySpec(port=port, settings={"model_refresh_interval": 0.5}), workers=workers)
    stack = Stack(spec, tmp_path / "logs")
    try:
        stack.start()
        stack.wait_ready(60)  # a worker that could not bind its ports would exit, failing this
        configs = [
            json.loads(_flag(_argv_of(tmp_path / n / "argv.json"), "--kv-events-config")) for n in ("one", "two")
        ]
        endpoints = [c[key] for c in configs for key in ("endpoint", "replay_endpoint")]
        assert endpoints == [
            f"tcp://*:{stack.kv_ports[name].events if key == 'endpoint' else stack.kv_ports[name].replay}"
            for name in ("one", "two")
            for key in ("endpoint", "replay_endpoint")
        ]
        assert len(set(endpoints)) == 4
        for config in configs:
            assert config["enable_kv_cache_events"] is True
            assert config["publisher"] == "zmq"
    finally:
        stack.stop()


def test_a_fixed_kv_port_already_in_use_stops_the_stack_before_it_starts(tmp_path: Path) -> None:
    port = free_port_block(3)
    worker = WorkerSpec(name="chat", model="/m", port=port + 1, kv_events_port=port + 2, env=replay_env(tmp_path))
    stack = Stack(StackSpec(gateway=GatewaySpec(port=port), workers=[worker]), tmp_path / "logs")
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", port + 2))
        blocker.listen()
        with pytest.raises(StackError, match=rf"chat KV events \({port + 2}\)"):
            stack.start()
    assert not stack.workers
