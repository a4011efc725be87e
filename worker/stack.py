"""`switchyard up`: real vLLM workers (or simulators with --sim) and the gateway on this machine.

Each child runs in its own process group with its output in a log file; the stack waits until every worker is
healthy and the gateway lists every model, showing progress, then prints how to call it. Ctrl-C (or SIGTERM)
stops the gateway, then every worker group, escalating to SIGKILL after a grace period: no orphans.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen
from types import FrameType
from typing import Any, Literal

import yaml

from worker import procs
from worker.models import DemoModels, PrepareError, default_models_dir, prepare
from worker.phases import READY, STARTING, LogPhases
from worker.stack_file import StackFileError, StackSpec, WorkerSpec, demo_stack, load_stack
from worker.startup_view import ChildStatus, StartupView, view_for


class StackError(RuntimeError):
    """The stack could not start; the message says which part and why."""


@dataclass(frozen=True)
class KvEventPorts:
    """Where one worker publishes its KV cache events (ZMQ PUB) and answers replays (ZMQ ROUTER)."""

    events: int
    replay: int


Kind = Literal["vllm", "sim", "gateway"]


@dataclass
class Child:
    name: str
    kind: Kind
    process: Popen[bytes]
    log: Path
    health_url: str
    started: float = field(default_factory=time.monotonic)
    ready_after: float | None = None
    phases: LogPhases | None = None  # vLLM workers: the startup phase read from the log

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def phase(self) -> str:
        if self.ready_after is not None:
            return READY
        return self.phases.poll() if self.phases is not None else STARTING

    def status(self, phase: str | None = None) -> ChildStatus:
        if self.ready_after is None:
            return ChildStatus(self.name, phase or self.phase(), "starting", self.started)
        return ChildStatus(self.name, phase or READY, "ready", self.started, self.started + self.ready_after)

    def failed(self, message: str) -> ChildStatus:
        return ChildStatus(self.name, message, "failed", self.started, time.monotonic())


def worker_argv(spec: WorkerSpec, sim: bool, kv: KvEventPorts | None = None) -> list[str]:
    """The command that runs one stack worker: the launcher for vLLM, or the simulator.

    A worker's key goes in its environment as VLLM_API_KEY (Stack.start), never on a command line: vLLM and
    the simulator both read it there.
    """
    if spec.model is None or spec.port is None:
        raise StackError(f"worker {spec.name} has no model/port to start")
    names = spec.served_model_names or [spec.model]
    if sim:
        argv = [sys.executable, "-m", "worker.sim", "--served-model-name", names[0], "--model", spec.model]
        for lora in spec.loras:
            argv += ["--lora", lora]
        if spec.runtime_lora:
            argv.append("--allow-runtime-lora")
        argv.append("--enable-prompt-tokens-details")  # as the launcher turns it on for vLLM
        if kv is not None:  # vLLM's own flags, which the simulator takes as they are
            config = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{kv.events}",
                      "replay_endpoint": f"tcp://*:{kv.replay}"}  # fmt: skip
            argv += ["--enable-prefix-caching", "--kv-events-config", json.dumps(config)]
        return [*argv, "--host", spec.host, "--port", str(spec.port), *spec.sim_args]
    argv = [sys.executable, "-m", "worker", "--model", spec.model, "--host", spec.host, "--port", str(spec.port)]
    for name in names:
        argv += ["--served-model-name", name]
    for lora, path in spec.loras.items():
        argv += ["--lora", f"{lora}={path}"]
    if spec.max_model_len is not None:
        argv += ["--max-model-len", str(spec.max_model_len)]
    if spec.runtime_lora:
        argv.append("--runtime-lora")
    if kv is not None:
        argv += ["--kv-events", "on", "--kv-events-port", str(kv.events), "--kv-replay-port", str(kv.replay)]
    else:  # explicit, so a SWITCHYARD_WORKER_KV_EVENTS in the caller's environment cannot turn it on
        argv += ["--kv-events", "off"]
    argv += ["--startup-timeout", str(spec.startup_timeout)]
    return [*argv, "--", *spec.args] if spec.args else argv


def kv_event_ports(stack: StackSpec) -> dict[str, KvEventPorts]:
    """Each started worker with kv_events gets its own two ports: the stack file's, else free ports that no
    other part of the stack uses, so two workers on one machine never collide."""
    local = [w for w in stack.workers if w.url is None and w.kv_events]
    taken = {w.port for w in stack.workers if w.port is not None} | {stack.gateway.port}
    taken |= {p for w in local for p in (w.kv_events_port, w.kv_replay_port) if p is not None}

    def free() -> int:
        for _ in range(100):
            port = procs.free_port_block(1)
            if port not in taken:
                taken.add(port)
                return port
        raise StackError("no free port for KV events")

    return {w.name: KvEventPorts(w.kv_events_port or free(), w.kv_replay_port or free()) for w in local}


def worker_keys(stack: StackSpec, environ: Mapping[str, str]) -> dict[str, str]:
    """Worker name -> the key its api_key_env names; StackError (naming the variable, never a value) if unset."""
    keys: dict[str, str] = {}
    for w in stack.workers:
        if w.api_key_env is not None:
            value = environ.get(w.api_key_env)
            if not value:
                raise StackError(f"worker {w.name}: api_key_env names {w.api_key_env}, which is not set here")
            keys[w.name] = value
    return keys


def gateway_config(stack: StackSpec) -> dict[str, object]:
    """The gateway's configuration file: keys appear in it only as the names of their environment variables."""
    config: dict[str, object] = {"model_refresh_interval": 2.0, **stack.gateway.settings}
    config["backends"] = [
        {"url": w.base_url, **({"api_key_env": w.api_key_env} if w.api_key_env else {})} for w in stack.workers
    ]
    return config


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.3)
        return sock.connect_ex(("127.0.0.1" if host in ("0.0.0.0", "") else host, port)) == 0


def gateway_models(url: str) -> set[str]:
    """The models the gateway routes, from /ready (open even when client keys guard /v1/models)."""
    body = procs.http_get(f"{url}/ready")
    if body is None:
        return set()
    try:
        return set(json.loads(body)["models"])
    except (ValueError, KeyError, TypeError):
        return set()


class Stack:
    """Starts, watches and stops the children of one stack."""

    def __init__(self, spec: StackSpec, log_dir: Path, sim: bool = False) -> None:
        self.spec = spec
        self.log_dir = log_dir
        self.sim = sim
        self.workers: list[Child] = []
        self.gateway: Child | None = None
        self.kv_ports: dict[str, KvEventPorts] = {}  # by worker name, once started

    @property
    def url(self) -> str:
        host = self.spec.gateway.host
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{self.spec.gateway.port}"

    def expected_models(self) -> set[str]:
        return {name for w in self.spec.workers for name in w.names}

    def _spawn(
        self, name: str, kind: Kind, argv: list[str], health_url: str, env: dict[str, str] | None = None
    ) -> Child:
        log = self.log_dir / f"{name}.log"
        with log.open("wb") as out:
            process = procs.spawn(argv, env={**os.environ, **(env or {})}, stdout=out)
        return Child(name, kind, process, log, health_url, phases=LogPhases(log) if kind == "vllm" else None)

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        local = [w for w in self.spec.workers if w.url is None]
        busy = [f"{w.name} ({w.port})" for w in local if w.port and port_in_use(w.host, w.port)]
        busy += [
            f"{w.name} KV events ({p})"
            for w in local
            if w.kv_events
            for p in (w.kv_events_port, w.kv_replay_port)
            if p and port_in_use(w.host, p)
        ]
        if port_in_use(self.spec.gateway.host, self.spec.gateway.port):
            busy.append(f"gateway ({self.spec.gateway.port})")
        if busy:
            raise StackError(f"port(s) already in use: {', '.join(busy)}; stop what runs there or change the ports")
        keys = worker_keys(self.spec, os.environ)
        self.kv_ports = kv_event_ports(self.spec)
        kind: Kind = "sim" if self.sim else "vllm"
        for w in local:
            key = keys.get(w.name)
            argv = worker_argv(w, self.sim, self.kv_ports.get(w.name))
            env = {**w.env, **({"VLLM_API_KEY": key} if key else {})}
            self.workers.append(self._spawn(w.name, kind, argv, f"{w.base_url}/health", env))
        config = self.log_dir / "gateway.yaml"
        config.write_text(yaml.safe_dump(gateway_config(self.spec), sort_keys=False))
        argv = [sys.executable, "-m", "gateway", "--config", str(config)]
        argv += ["--host", self.spec.gateway.host, "--port", str(self.spec.gateway.port)]
        # the backends' api_key_env variables, set in the gateway's environment whatever the caller's holds
        gateway_env = {w.api_key_env: keys[w.name] for w in self.spec.workers if w.api_key_env}
        self.gateway = self._spawn("gateway", "gateway", argv, f"{self.url}/health", gateway_env)

    def children(self) -> list[Child]:
        return [*self.workers, *([self.gateway] if self.gateway else [])]

    def dead(self) -> Child | None:
        return next((c for c in self.children() if c.process.poll() is not None), None)

    def wait_ready(self, timeout: float, view: StartupView | None = None) -> None:
        """Until every worker is healthy and the gateway lists every expected model; StackError otherwise."""
        expected = self.expected_models()
        deadline = time.monotonic() + timeout
        while True:
            dead = self.dead()
            if dead is not None:
                phase = dead.phase()
                code = procs.exit_code(dead.process.returncode)
                if view is not None:
                    failed = dead.failed(f"failed: exited with code {code} while {phase}")
                    view.show([failed if c is dead else c.status() for c in self.children()])
                raise StackError(
                    f"{dead.name} exited with code {code} while {phase} (after "
                    f"{time.monotonic() - dead.started:.0f} s); last lines of {dead.log}:\n{dead.tail()}"
                )
            for child in self.workers:
                if child.ready_after is None and procs.http_ok(child.health_url, timeout=1.0):
                    child.ready_after = time.monotonic() - child.started
            listed = expected & gateway_models(self.url)
            gateway = self.gateway
            if gateway is not None and gateway.ready_after is None and listed == expected:
                gateway.ready_after = time.monotonic() - gateway.started
            if view is not None:
                view.show([*(w.status() for w in self.workers), *self._gateway_status(listed, expected)])
            if listed == expected and all(c.ready_after is not None for c in self.workers):
                return
            if time.monotonic() > deadline:
                waiting = [c.name for c in self.children() if c.ready_after is None]
                missing = expected - listed
                raise StackError(
                    f"not ready after {timeout:.0f} s: waiting for {', '.join(waiting) or 'nothing'}; "
                    f"models not listed by the gateway: {', '.join(sorted(missing)) or 'none'} "
                    f"(logs in {self.log_dir})"
                )
            time.sleep(1.0)

    def _gateway_status(self, listed: set[str], expected: set[str]) -> list[ChildStatus]:
        gateway = self.gateway
        if gateway is None:
            return []
        if gateway.ready_after is not None:
            return [gateway.status(f"ready, serving {len(expected)} model(s)")]
        if procs.http_ok(gateway.health_url, timeout=1.0):
            return [gateway.status(f"waiting for the workers ({len(listed)}/{len(expected)} models listed)")]
        return [gateway.status(STARTING)]

    def stop(self, grace: float = 30.0) -> None:
        """Gateway first (no new traffic), then all workers at once; SIGKILL whatever outlives grace."""
        if self.gateway is not None:
            procs.stop(self.gateway.process, grace=10.0)
        for w in self.workers:
            if w.process.poll() is None:
                procs.signal_group(w.process, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for w in self.workers:
            procs.stop(w.process, grace=max(0.1, deadline - time.monotonic()))


def client_key_hint(settings: Mapping[str, Any]) -> str | None:
    """How the banner's examples name the gateway's client key: `$VAR` for the first key_env, a placeholder for
    a key given any other way, None when the gateway is open. Never the key itself."""
    auth = settings.get("auth")
    if not isinstance(auth, dict):
        return None
    keys = [k for k in auth.get("keys") or [] if isinstance(k, dict)]
    named = next((k["key_env"] for k in keys if isinstance(k.get("key_env"), str)), None)
    if named is not None:
        return f"${named}"
    return "YOUR_KEY" if keys or auth.get("keys_file") else None


def banner(stack: Stack) -> str:
    spec = stack.spec
    chat = next((w for w in spec.workers if w.loras or "smollm2" in w.names), spec.workers[0])
    model = chat.names[0]
    url = stack.url
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Say hello in five words."}]})
    key = client_key_hint(spec.gateway.settings)
    header = f' -H "Authorization: Bearer {key}"' if key else ""
    from_env = key is not None and key.startswith("$")
    api_key = f'os.environ["{key[1:]}"]' if key and from_env else f'"{key or "none"}"'
    sdk = (
        f"{'import os; ' if from_env else ''}from openai import OpenAI; "
        f'c = OpenAI(base_url="{url}/v1", api_key={api_key}); print(c.chat.completions.create(model="{model}", '
        'messages=[{"role": "user", "content": "Say hello in five words."}]).choices[0].message.content)'
    )
    kv_lines = []
    if stack.kv_ports:
        published = ", ".join(
            f"{name} tcp://127.0.0.1:{p.events} (replay {p.replay})" for name, p in stack.kv_ports.items()
        )
        kv_lines = [f"KV cache events: {published}"]
    return "\n".join(
        [
            f"Switchyard is up at {url} serving: {', '.join(sorted(stack.expected_models()))}",
            "",
            "  curl:",
            f"    curl -s {url}/v1/chat/completions -H 'Content-Type: application/json'{header} -d '{body}'",
            "  openai SDK:",
            f"    python -c '{sdk}'",
            "",
            *kv_lines,
            f"Logs in {stack.log_dir}. Press Ctrl-C to stop everything.",
        ]
    )


def _raise_interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="switchyard up",
        description="Start workers and the gateway on this machine (default: the demo models on real vLLM).",
    )
    p.add_argument("--sim", action="store_true", help="run the same topology on simulators (starts in seconds)")
    p.add_argument("--stack", type=Path, default=None, help="stack file describing your own workers (YAML)")
    p.add_argument("--models-dir", type=Path, default=None, help=f"demo models (default {default_models_dir()})")
    p.add_argument("--port", type=int, default=8000, help="gateway port for the demo stack (workers use +1, +2)")
    p.add_argument("--log-dir", type=Path, default=None, help="where the children's logs go (default: a temp dir)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for everything to be ready")
    args = p.parse_args(argv)
    models = (args.models_dir or default_models_dir()).expanduser().resolve()
    try:
        spec = load_stack(args.stack, models) if args.stack else demo_stack(models, args.port)
        worker_keys(spec, os.environ)  # an unset key variable stops here, before anything starts
        local = any(w.url is None for w in spec.workers)
        if not args.sim and local and importlib.util.find_spec("vllm") is None:
            raise StackError("vLLM is not installed here: run scripts/setup.sh, or try the stack with --sim")
        if not args.sim and not args.stack and not DemoModels(models).ready():
            print(f"preparing the demo models in {models} (once)...", flush=True)
            prepare(models)
    except (StackFileError, PrepareError, StackError) as exc:
        print(f"switchyard up: {exc}", file=sys.stderr)
        return 2
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="switchyard-up-"))
    stack = Stack(spec, log_dir, sim=args.sim)
    for sig in (signal.SIGTERM, signal.SIGINT):  # SIGINT too: a background job inherits it ignored
        signal.signal(sig, _raise_interrupt)
    kind = "simulated" if args.sim else "vLLM"
    try:
        print(f"starting {len(spec.workers)} {kind} worker(s) and the gateway (logs in {log_dir})", flush=True)
        stack.start()
        with view_for(sys.stdout) as view:
            stack.wait_ready(args.timeout, view)
        print(f"\n{banner(stack)}", flush=True)
        while (dead := stack.dead()) is None:
            time.sleep(1.0)
        code = procs.exit_code(dead.process.returncode)
        print(
            f"switchyard up: {dead.name} exited with code {code}; stopping everything. "
            f"Last lines of {dead.log}:\n{dead.tail()}",
            file=sys.stderr,
            flush=True,
        )
        return 1
    except StackError as exc:
        print(f"\nswitchyard up: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping...", flush=True)
        return 0
    finally:
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
