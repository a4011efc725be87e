"""Two real vLLM CPU workers (chat model + two LoRA adapters; embedding model) behind the gateway.

The stack is started once per session through the same code as `switchyard up` (the worker launcher runs each
vLLM), both workers in parallel. Needs the CPU vLLM and the demo models: run scripts/setup.sh first.
The module that kills a worker (test_worker_loss.py) sorts last on purpose.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.otlp_receiver import OtlpReceiver, otlp_receiver
from worker.models import DemoModels, default_models_dir, prepare
from worker.procs import free_port_block
from worker.stack import Stack
from worker.stack_file import GatewaySpec, StackSpec, WorkerSpec, demo_stack

REFRESH_INTERVAL = 1.0  # the gateway's /v1/models polling period in this suite
ADMIN_KEY_ENV = "SWITCHYARD_E2E_ADMIN_KEY"  # the gateway's admin key (GET /admin/fleet) in this suite
ADMIN_KEY = "e2e-admin-key"
# Where the gateway and the chat worker export their traces: a receiver that lives as long as the stack.
OTLP_PORT = free_port_block(1)
STARTUP_TIMEOUT = 900.0
LOG_LINES = 60  # of each child's log, attached to a failing test's report
STACK_KEY = pytest.StashKey[Stack]()  # the session's stack, for the report of a failing test


@dataclass(frozen=True)
class E2EStack:
    stack: Stack
    models: DemoModels
    traces: OtlpReceiver  # every span the gateway and the chat worker exported

    @property
    def gateway(self) -> str:
        return self.stack.url

    @property
    def chat_worker(self) -> str:
        return self.stack.spec.workers[0].base_url

    @property
    def embed_worker(self) -> str:
        return self.stack.spec.workers[1].base_url

    def fleet(self) -> dict[str, Any]:
        """The gateway's GET /admin/fleet, backends by URL."""
        answer = httpx.get(f"{self.gateway}/admin/fleet", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
        answer.raise_for_status()
        return {backend["url"]: backend for backend in answer.json()["backends"]}

    def client(self, timeout: float = 120.0) -> OpenAI:
        return OpenAI(base_url=f"{self.gateway}/v1", api_key="unused", timeout=timeout, max_retries=0)

    def metric(self, base_url: str, name: str) -> float:
        """Sum of one metric's samples on a worker's /metrics."""
        total = 0.0
        for line in httpx.get(f"{base_url}/metrics", timeout=10).text.splitlines():
            if line.startswith(name) and line[len(name)] in "{ ":
                total += float(line.rsplit(" ", 1)[1])
        return total


def _spec(models: Path) -> StackSpec:
    demo = demo_stack(models, runtime_lora=True)
    port = free_port_block(3)
    chat, embed = demo.workers
    settings = {
        "model_refresh_interval": REFRESH_INTERVAL,
        "admin": {"key_env": ADMIN_KEY_ENV},
        "tracing": {"enabled": True},
    }
    # The chat worker runs vLLM's dev routes too: POST /reset_prefix_cache, to see AllBlocksCleared arrive.
    # It exports its request spans over OTLP/HTTP, as the gateway does (OTEL_EXPORTER_OTLP_ENDPOINT below).
    chat_env = {**chat.env, "VLLM_SERVER_DEV_MODE": "1", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
                "OTEL_SERVICE_NAME": "vllm-chat"}  # fmt: skip
    chat_args = [*chat.args, "--otlp-traces-endpoint", f"http://127.0.0.1:{OTLP_PORT}/v1/traces"]
    return StackSpec(
        gateway=GatewaySpec(port=port, settings=settings),
        workers=[
            chat.model_copy(update={"port": port + 1, "env": chat_env, "args": chat_args}),
            embed.model_copy(update={"port": port + 2}),
        ],
    )


@pytest.fixture(scope="session")
def e2e(request: pytest.FixtureRequest) -> Iterator[E2EStack]:
    if importlib.util.find_spec("vllm") is None:
        pytest.fail("the e2e suite needs the CPU build of vLLM in this environment: run scripts/setup.sh")
    root = Path(os.environ.get("SWITCHYARD_MODELS_DIR") or default_models_dir())
    models = DemoModels(root) if DemoModels(root).ready() else prepare(root)
    log_dir = Path(tempfile.mkdtemp(prefix="switchyard-e2e-"))
    os.environ[ADMIN_KEY_ENV] = ADMIN_KEY  # the gateway process inherits these
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{OTLP_PORT}"
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "200"  # export batches every 200 ms, not 5 s
    stack = Stack(_spec(root), log_dir)
    request.config.stash[STACK_KEY] = stack
    receiver_server, receiver = otlp_receiver(OTLP_PORT)
    started = time.monotonic()
    with receiver_server:
        try:
            stack.start()
            stack.wait_ready(STARTUP_TIMEOUT)
            print(f"\ne2e stack ready in {time.monotonic() - started:.0f} s: "
                  + ", ".join(f"{c.name} {c.ready_after:.0f} s" for c in stack.workers if c.ready_after)
                  + f" (logs in {log_dir})")  # fmt: skip
            yield E2EStack(stack, models, receiver)
        finally:
            stack.stop()


def worker_spec(e2e: E2EStack, name: str) -> WorkerSpec:
    return next(w for w in e2e.stack.spec.workers if w.name == name)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    """A failing test's report ends with the last lines of the gateway's and each worker's log: the temp dir
    that holds them is gone by the time anyone reads a CI run's output."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    stack = item.config.stash.get(STACK_KEY, None)
    if report.failed and stack is not None:
        for child in [stack.gateway, *stack.workers]:
            if child is not None:
                report.sections.append((f"{child.name} log (last {LOG_LINES} lines)", child.tail(LOG_LINES)))
