"""Proof with a real Prometheus: it scrapes a live gateway and live simulators while traffic flows, then
every panel query of both dashboards (template variables filled in) must return data, and every alert
must stay quiet on the healthy parts and return a series once its fault is injected.

The fleet (target labels as Prometheus in a cluster would add them: namespace, pod, job):
- alpha-0: `alpha` + LoRA `alpha-lora`, healthy, max 4 running (so a flood queues)
- alpha-1: the same models, answers every generation 503: the gateway retries on alpha-0
  (alpha is routed round robin, so half of its requests try alpha-1 first)
- beta-0: `beta`, healthy; admission lets 2 `beta` requests in at once and queues none (429 beyond);
  killed later: "no backend for a served model"
- gamma-0: `gamma`, half its generations fail with 500 and prefill is slow (p95 TTFT > 2 s)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from typing import Any

import httpx
import pytest

from tests.observability import checks, grafana
from tests.observability.prometheus import (
    MISSING_REASON,
    Prometheus,
    ScrapeTarget,
    prometheus_binary,
    promtool_binary,
    running_prometheus,
)
from tests.servers import GatewayServer, SimProcess, running_sims, sim
from worker.procs import free_port_block

pytestmark = [
    pytest.mark.skipif(prometheus_binary() is None, reason=MISSING_REASON),
    pytest.mark.timeout(240),
]

NAMESPACE = "switchyard-test"
GATEWAY_JOB = "switchyard-gateway"  # as the chart's ServiceMonitor names it: the gateway Service
WORKER_JOB = f"{NAMESPACE}/switchyard-workers"  # as the chart's PodMonitor names it: namespace/name
SYSTEM = "You are a terse assistant of the Switchyard observability test. " * 4  # shared prefix: cache hits

Samples = list[dict[str, Any]]


class Traffic:
    """Client load on its own event loop in a thread: loops of mixed requests until stopped; records
    the statuses seen per (route, model)."""

    def __init__(self, gateway: str) -> None:
        self.gateway = gateway
        self.seen: Counter[tuple[str, str, int]] = Counter()
        self.errors: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._stop = asyncio.Event()
        self._tasks: list[Future[None]] = []
        self._client: httpx.AsyncClient | None = None
        self._stopped = False
        self._flooding = False

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def stop(self) -> None:
        """End every loop (a request still in flight after a few seconds is cancelled); idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._flooding = False
        self._loop.call_soon_threadsafe(self._stop.set)
        deadline = time.monotonic() + 5
        for task in self._tasks:
            with contextlib.suppress(Exception):
                task.result(max(0.1, deadline - time.monotonic()))
            task.cancel()
        if self._client is not None:
            asyncio.run_coroutine_threadsafe(self._client.aclose(), self._loop).result(10)

    def spawn(self, factory: Callable[[], Awaitable[None]]) -> None:
        self._tasks.append(asyncio.run_coroutine_threadsafe(self._forever(factory), self._loop))

    async def _forever(self, factory: Callable[[], Awaitable[None]]) -> None:
        while not self._stop.is_set():
            try:
                await factory()
            except Exception as exc:  # recorded, and the test fails on any
                self.errors.append(repr(exc))
                await asyncio.sleep(0.2)

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=20)
            self._client = httpx.AsyncClient(timeout=60.0, limits=limits)
        return self._client

    async def post(self, base: str, route: str, payload: dict[str, Any]) -> int:
        body = {"max_tokens": 8, **payload}
        if payload.get("stream"):
            async with self.client.stream("POST", f"{base}{route}", json=body) as response:
                async for _ in response.aiter_bytes():
                    pass
        else:
            response = await self.client.post(f"{base}{route}", json=body)
        self.seen[(route, str(payload.get("model")), response.status_code)] += 1
        return response.status_code

    # --- the mixes -----------------------------------------------------------------------------------

    async def mixed(self) -> None:
        g = self.gateway
        user = f"question {random.randrange(10_000)}"
        chat = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
        await self.post(g, "/v1/chat/completions", {"model": "alpha", "messages": chat})
        await self.post(g, "/v1/chat/completions", {"model": "alpha", "messages": chat, "stream": True})
        await self.post(g, "/v1/chat/completions", {"model": "alpha-lora", "messages": chat, "stream": True})
        await self.post(g, "/v1/completions", {"model": "alpha", "prompt": SYSTEM + user})
        await self.post(g, "/v1/completions", {"model": "alpha", "prompt": SYSTEM + user, "stream": True})
        await self.post(g, "/v1/embeddings", {"model": "beta", "input": [user, SYSTEM]})
        await self.post(g, "/v1/chat/completions", {"model": "beta", "messages": chat, "stream": True})
        await self.post(g, "/v1/chat/completions", {"model": "no-such-model", "messages": chat})
        await asyncio.sleep(0.05)

    async def lora(self) -> None:
        """Long alpha-lora streams back to back: the adapter is in a running batch most of the time, so
        vllm:lora_requests_info names it in most scrapes."""
        chat = [{"role": "user", "content": "adapter"}]
        payload = {"model": "alpha-lora", "messages": chat, "stream": True, "max_tokens": 300}
        await self.post(self.gateway, "/v1/chat/completions", payload)

    async def beta_burst(self) -> None:
        """More `beta` streams at once than admission lets in: some get 429 (queue_full)."""
        chat = [{"role": "user", "content": "burst"}]
        payload = {"model": "beta", "messages": chat, "stream": True, "max_tokens": 40}
        await asyncio.gather(*(self.post(self.gateway, "/v1/chat/completions", payload) for _ in range(6)))
        await asyncio.sleep(0.5)

    async def gamma(self) -> None:
        """A fresh ~100-token prompt each time (no prefix-cache hit): ~3 s of prefill on gamma-0."""
        words = " ".join(f"w{random.randrange(10**6):06d}" for _ in range(50))
        chat = [{"role": "user", "content": words}]
        await self.post(self.gateway, "/v1/chat/completions", {"model": "gamma", "messages": chat, "stream": True})

    def flood(self, base: str, per_second: float) -> Future[None]:
        """Open-loop requests straight to one engine, faster than it serves them, until stop_flood():
        its queue grows. The requests still open then are cancelled (the engine aborts them)."""

        async def run() -> None:
            chat = [{"role": "user", "content": "flood"}]
            payload = {"model": "alpha", "messages": chat, "max_tokens": 1000, "ignore_eos": True}
            pending: set[asyncio.Task[int]] = set()
            while self._flooding:
                pending.add(asyncio.create_task(self.post(base, "/v1/chat/completions", payload)))
                await asyncio.sleep(1 / per_second)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

        self._flooding = True
        return asyncio.run_coroutine_threadsafe(run(), self._loop)

    def stop_flood(self, flood: Future[None]) -> None:
        self._flooding = False
        flood.result(15)


def target(job: str, url: str, pod: str) -> ScrapeTarget:
    return ScrapeTarget(job, url.removeprefix("http://"), {"namespace": NAMESPACE, "pod": pod})


def models_of(samples: Samples, label: str = "model") -> set[str]:
    return {sample["metric"].get(label, "") for sample in samples}


def kv_events() -> list[str]:
    """vLLM's flags for KV cache events on two free ports (the prefix-cache panels need some)."""
    port = free_port_block(2)
    config = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{port}",
              "replay_endpoint": f"tcp://*:{port + 1}"}  # fmt: skip
    return ["--enable-prefix-caching", "--kv-events-config", json.dumps(config)]


@contextlib.contextmanager
def fleet() -> Iterator[dict[str, SimProcess]]:
    details = "--enable-prompt-tokens-details"
    sims = {
        "alpha-0": sim("alpha", "--lora", "alpha-lora", "--max-num-seqs", "4", details),
        "alpha-1": sim("alpha", "--lora", "alpha-lora", "--fail-rate", "1", "--fail-status", "503"),
        "beta-0": sim("beta", details, *kv_events()),
        # later options win: slow prefill over sim()'s fast default
        "gamma-0": sim(
            "gamma", "--prefill-ms-per-token", "30", "--fail-rate", "0.5", "--fail-status", "500", details, *kv_events()
        ),
    }
    with running_sims(*sims.values()):
        yield sims


def gateway_config(sims: dict[str, SimProcess]) -> dict[str, Any]:
    return {
        "backends": [{"url": s.url} for s in sims.values()],
        "model_refresh_interval": 0.5,
        "health": {"interval": 0.5, "unhealthy_threshold": 1, "eject_after": 1_000_000},
        "retries": {"budget_ratio": 1.0},
        "routing": {"models": {"alpha": "round_robin"}},  # half of alpha's requests go to alpha-1 first
        "admission": {"models": {"beta": 2}, "queue_size": 0},
        "access_log": False,
    }


def test_every_panel_and_alert_against_a_live_prometheus() -> None:
    rules = checks.alert_rules()
    alert_files = sorted(grafana.ALERTS.glob("*.yaml"))
    with fleet() as sims, GatewayServer(gateway_config(sims)) as gw:
        targets = [target(GATEWAY_JOB, gw.url, "switchyard-gateway-0")]
        targets += [target(WORKER_JOB, s.url, pod) for pod, s in sims.items()]
        with running_prometheus(targets, rule_files=alert_files) as prom, Traffic(gw.url) as traffic:
            prom.wait_for_targets_up()
            for _ in range(3):
                traffic.spawn(traffic.mixed)
            traffic.spawn(traffic.lora)
            traffic.spawn(traffic.beta_burst)
            traffic.spawn(traffic.gamma)

            check_panels(prom)
            check_variables(prom)
            assert_traffic_mix(traffic, prom)
            check_rules_evaluate(prom, rules)
            check_alerts_quiet_then_fire(prom, traffic, sims, gw)


def check_panels(prom: Prometheus) -> None:
    """Every panel target returns data: per served model (one with retries, one with rejections) and for
    All, with Grafana's $__rate_interval at its 1 s-scrape minimum-ish and at a cluster's usual 1m."""
    variable_sets = [
        {"datasource": "prometheus", "namespace": NAMESPACE, "model": model, "__rate_interval": window,
         "__interval": "1s", "__range": "5m"}
        for model in ("alpha", "beta", ".*")
        for window in ("15s", "1m")
    ]  # fmt: skip
    failing = checks.panels_without_data(prom, variable_sets, timeout=60)
    assert not failing, "panels without data:\n" + "\n".join(r.describe() for r in failing)


def check_variables(prom: Prometheus) -> None:
    """The namespace and model variables' label_values() queries list what the panels are filtered by."""
    expected = {  # by label: what each must list at least
        "namespace": {NAMESPACE},
        "model": {"alpha", "alpha-lora", "beta", "gamma"},  # the gateway's label: adapters too
        "model_name": {"alpha", "beta", "gamma"},  # vLLM's: the first served name of each engine
    }
    missing: list[tuple[str, str, set[str]]] = []
    deadline = time.monotonic() + 15  # gamma's first answer may still be on its way
    while True:
        missing = []
        for path in grafana.dashboard_files():
            variables = grafana.variable_queries(grafana.load(path))
            assert set(variables) == {"namespace", "model"}, path.name
            for name, query in variables.items():
                match, label = grafana.parse_label_values(query)
                values = set(prom.label_values(label, grafana.fill(match, {"namespace": ".*"}) if match else None))
                if not expected[label] <= values:
                    missing.append((path.name, name, values))
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert missing == []


def assert_traffic_mix(traffic: Traffic, prom: Prometheus) -> None:
    """The load really had what the panels claim to show (so "has data" is not "has zeros")."""
    seen = traffic.seen
    for route, model in [
        ("/v1/chat/completions", "alpha"),
        ("/v1/chat/completions", "alpha-lora"),
        ("/v1/completions", "alpha"),
        ("/v1/embeddings", "beta"),
    ]:
        assert seen[(route, model, 200)] > 0, (route, model, seen)
    assert seen[("/v1/chat/completions", "no-such-model", 404)] > 0
    assert seen[("/v1/chat/completions", "beta", 429)] > 0
    assert seen[("/v1/chat/completions", "alpha", 503)] == 0  # alpha-1's 503s were retried on alpha-0

    def total(expr: str) -> float:
        return sum(checks.finite_values(prom.query(expr)))

    assert total('sum(switchyard_retries_total{model="alpha"})') > 0
    assert total('sum(switchyard_rejected_requests_total{model="beta", reason="queue_full"})') > 0
    assert total('sum(switchyard_requests_total{model="__unknown__", code="404"})') > 0
    assert total('sum(switchyard_tokens_total{model="alpha-lora", kind="completion"})') > 0
    assert total('sum(vllm:prefix_cache_hits_total{pod="alpha-0"})') > 0
    # a scrape saw alpha-lora in a running batch (on either alpha worker: alpha-1 fails it at once)
    prom.wait_for('count_over_time(vllm:lora_requests_info{running_lora_adapters=~".*alpha-lora.*"}[5m])')


def check_rules_evaluate(prom: Prometheus, rules: list[checks.AlertRule]) -> None:
    promtool = promtool_binary()
    if promtool is not None:
        for path in sorted(grafana.ALERTS.glob("*.yaml")):
            done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
            assert done.returncode == 0, done.stdout + done.stderr
    for rule in rules:
        prom.query(rule.expr)  # raises on any evaluation error
    loaded = {rule["name"]: rule for rule in prom.rules()}
    assert set(loaded) == {rule.name for rule in rules}

    def evaluated() -> bool:
        return all(r["health"] == "ok" and not r["lastEvaluation"].startswith("0001") for r in prom.rules())

    deadline = time.monotonic() + 10
    while not evaluated() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert [(r["name"], r["health"], r.get("lastError")) for r in prom.rules() if r["health"] != "ok"] == []


def alert_series(prom: Prometheus, name: str) -> Samples:
    (rule,) = [r for r in checks.alert_rules() if r.name == name]
    return prom.query(rule.expr)


def wait_alert(prom: Prometheus, name: str, ready: Callable[[Samples], bool], timeout: float = 30) -> Samples:
    deadline = time.monotonic() + timeout
    while True:
        series = alert_series(prom, name)
        if ready(series):
            return series
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}: expected series never came, last: {series}")
        time.sleep(0.5)


def active_alerts(prom: Prometheus) -> dict[str, list[dict[str, str]]]:
    found: dict[str, list[dict[str, str]]] = {}
    for alert in prom.alerts():
        if alert["state"] in ("pending", "firing"):
            found.setdefault(alert["labels"]["alertname"], []).append(alert["labels"])
    return found


def check_alerts_quiet_then_fire(
    prom: Prometheus, traffic: Traffic, sims: dict[str, SimProcess], gw: GatewayServer
) -> None:
    """Healthy models raise nothing; each injected fault makes its expression return the faulty series
    (evaluated directly, as `for:` is minutes long), and Prometheus' own rule evaluation turns the
    alert pending for those series."""
    # gamma has failed and been slow since the start; alpha and beta are healthy
    errors = wait_alert(prom, "SwitchyardHighErrorRatio", lambda s: "gamma" in models_of(s))
    assert models_of(errors) == {"gamma"}, errors
    assert traffic.seen[("/v1/chat/completions", "gamma", 500)] > 0
    slow = wait_alert(prom, "SwitchyardHighTimeToFirstToken", lambda s: "gamma" in models_of(s))
    assert models_of(slow) == {"gamma"}, slow
    assert all(float(s["value"][1]) > 2 for s in slow)
    assert alert_series(prom, "SwitchyardNoBackendForModel") == []
    assert alert_series(prom, "SwitchyardEngineQueueGrowing") == []
    assert alert_series(prom, "SwitchyardGatewayDown") == []

    # a dead backend: beta's only worker
    sims["beta-0"].kill()
    dead = wait_alert(prom, "SwitchyardNoBackendForModel", bool)
    assert {(s["metric"]["namespace"], s["metric"]["model"]) for s in dead} == {(NAMESPACE, "beta")}

    # an engine queue that keeps growing: alpha-0 (4 slots) flooded with long requests
    flood = traffic.flood(sims["alpha-0"].url, per_second=15)
    try:
        growing = wait_alert(prom, "SwitchyardEngineQueueGrowing", bool)
        assert {(s["metric"]["pod"], s["metric"]["model_name"]) for s in growing} == {("alpha-0", "alpha")}
        # Prometheus' rule evaluation agrees: each alert pending (its `for:` running) for the faulty series.
        # The faults may also trip neighbours, truly: beta's requests now fail (503, no backend) and
        # alpha's streams wait behind the flood; nothing else may show up.
        required = {
            "SwitchyardHighErrorRatio": {"gamma"},
            "SwitchyardHighTimeToFirstToken": {"gamma"},
            "SwitchyardNoBackendForModel": {"beta"},
            "SwitchyardEngineQueueGrowing": {"alpha"},
        }
        collateral = {"SwitchyardHighErrorRatio": {"beta"}, "SwitchyardHighTimeToFirstToken": {"alpha"}}
        deadline = time.monotonic() + 15
        while True:
            active = active_alerts(prom)
            got = {
                name: {labels.get("model") or labels.get("model_name", "") for labels in active.get(name, [])}
                for name in required
            }
            if all(required[name] <= got[name] for name in required) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        traffic.stop_flood(flood)
    assert set(active) <= set(required), active
    for name, models in required.items():
        assert models <= got[name] <= models | collateral.get(name, set()), (name, active)
    assert {labels["severity"] for alerts in active.values() for labels in alerts} <= {"warning", "critical"}

    # the gateway itself goes away: its scrape fails
    traffic.stop()
    assert not traffic.errors, traffic.errors[:5]
    gw.__exit__(None, None, None)
    down = wait_alert(prom, "SwitchyardGatewayDown", bool)
    assert [(s["metric"].get("namespace"), s["metric"].get("job")) for s in down] == [(NAMESPACE, GATEWAY_JOB)]
    assert math.isclose(float(down[0]["value"][1]), 0.0)
