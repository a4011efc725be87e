"""The dashboards against real vLLM: a real Prometheus scrapes the gateway and both real workers while
traffic flows, and every panel of both dashboards must return data (issue 6's proof on real engines).

Runs before test_worker_loss (file order), while both workers are up.
"""

from __future__ import annotations

import contextlib
import threading

import openai
import pytest

from tests.e2e.conftest import E2EStack
from tests.observability import checks
from tests.observability.prometheus import MISSING_REASON, ScrapeTarget, prometheus_binary, running_prometheus

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]  # Prometheus start, targets up, then panels

NAMESPACE = "switchyard-e2e"
GATEWAY_JOB = "switchyard-gateway"  # as the chart's ServiceMonitor names it
WORKER_JOB = f"{NAMESPACE}/switchyard-workers"  # as the chart's PodMonitor names it


def target(job: str, url: str, pod: str) -> ScrapeTarget:
    return ScrapeTarget(job, url.removeprefix("http://"), {"namespace": NAMESPACE, "pod": pod})


class Traffic:
    """Chat (stream and not, base and adapter), completions (one a block long), embeddings and a 404, in a loop,
    until stopped."""

    def __init__(self, e2e: E2EStack) -> None:
        self._client = e2e.client(timeout=60)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.errors: list[str] = []

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def _run(self) -> None:
        chat = [{"role": "user", "content": "Name a colour."}]
        # Longer than one KV block (128 tokens on the CPU worker) and new each round: the engine publishes a
        # BlockStored event for it, which the KV-event panels (events, lag) need.
        filler = "The sky is blue and the grass is green. " * 20
        round_ = 0
        while not self._stop.is_set():
            round_ += 1
            try:
                for model in ("smollm2", "lora-a"):
                    stream = self._client.chat.completions.create(
                        model=model,
                        messages=chat,
                        max_tokens=6,
                        stream=True,  # type: ignore[arg-type]
                    )
                    for _ in stream:
                        pass
                self._client.chat.completions.create(model="smollm2", messages=chat, max_tokens=4)  # type: ignore[arg-type]
                self._client.completions.create(model="smollm2", prompt="The sky is", max_tokens=4)
                self._client.completions.create(model="smollm2", prompt=f"Round {round_}. {filler}", max_tokens=1)
                self._client.embeddings.create(model="minilm", input="switchyard")
                with contextlib.suppress(openai.NotFoundError):  # a 404 on purpose: the error panels count it
                    self._client.chat.completions.create(model="no-such-model", messages=chat)  # type: ignore[arg-type]
            except openai.OpenAIError as exc:
                self.errors.append(repr(exc))


def test_every_panel_has_data_with_real_vllm(e2e: E2EStack) -> None:
    if prometheus_binary() is None:
        pytest.fail(MISSING_REASON)  # CI installs it: never skip silently here
    targets = [
        target(GATEWAY_JOB, e2e.gateway, "switchyard-gateway-0"),
        target(WORKER_JOB, e2e.chat_worker, "switchyard-smollm2-0"),
        target(WORKER_JOB, e2e.embed_worker, "switchyard-minilm-0"),
    ]
    with running_prometheus(targets) as prom, Traffic(e2e) as traffic:
        prom.wait_for_targets_up(timeout=60)
        variable_sets = [
            {"datasource": "prometheus", "namespace": NAMESPACE, "model": model, "__rate_interval": "1m",
             "__interval": "1s", "__range": "5m"}
            for model in ("smollm2", ".*")
        ]  # fmt: skip
        failing = checks.panels_without_data(prom, variable_sets, timeout=90)
    assert not traffic.errors, traffic.errors[:3]  # first: failing traffic would leave panels empty
    assert not failing, "panels without data against real vLLM:\n" + "\n".join(r.describe() for r in failing)
