"""A real Prometheus server (Debian's `prometheus` package) on loopback, for tests.

Reusable by any suite (the e2e suite points it at real vLLM workers):

    targets = [ScrapeTarget("switchyard-gateway", "127.0.0.1:8080", {"namespace": "ns", "pod": "gateway-0"})]
    with running_prometheus(targets, rule_files=[Path("alerts.yaml")]) as prom:
        prom.wait_for_targets_up()
        series = prom.query('sum by (model) (rate(switchyard_requests_total[1m]))')

Each target becomes one static target of a scrape job named after `job`, with `labels` as target labels:
that is how the `namespace` and `pod` labels Prometheus adds in a cluster are reproduced here.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.servers import free_port

Sample = dict[str, Any]  # one element of a query result: {"metric": {...}, "value": [t, "v"]}


class PromQLError(AssertionError):
    """Prometheus refused a query (bad syntax, many-to-many matching, ...)."""


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


def promtool_binary() -> str | None:
    return shutil.which("promtool")


MISSING_REASON = "the `prometheus` binary is not installed (Debian package `prometheus`; scripts/setup.sh installs it)"


@dataclass(frozen=True)
class ScrapeTarget:
    job: str
    address: str  # host:port
    labels: Mapping[str, str] = field(default_factory=dict)
    metrics_path: str = "/metrics"


def render_config(
    targets: Sequence[ScrapeTarget],
    rule_files: Sequence[Path] = (),
    scrape_interval: str = "1s",
    evaluation_interval: str = "1s",
) -> dict[str, Any]:
    """The prometheus.yml for `targets`: one scrape job per (job, metrics path)."""
    jobs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for target in targets:
        jobs.setdefault((target.job, target.metrics_path), []).append(
            {"targets": [target.address], "labels": dict(target.labels)}
        )
    names = [job for job, _ in jobs]
    if len(names) != len(set(names)):
        raise ValueError("one job cannot have two metrics paths")
    return {
        "global": {
            "scrape_interval": scrape_interval,
            "scrape_timeout": scrape_interval,
            "evaluation_interval": evaluation_interval,
        },
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [
            {"job_name": job, "metrics_path": path, "static_configs": static} for (job, path), static in jobs.items()
        ],
    }


class Prometheus:
    """A running server: its HTTP API, as the assertions of a test need it."""

    def __init__(self, url: str, process: subprocess.Popen[bytes], log: Path) -> None:
        self.url = url
        self.process = process
        self.log = log
        self._http = httpx.Client(base_url=url, timeout=10.0)

    def close(self) -> None:
        self._http.close()

    def _api(self, path: str, params: dict[str, str] | None = None) -> Any:
        response = self._http.get(f"/api/v1/{path}", params=params)
        body = response.json()
        if body.get("status") != "success":
            raise PromQLError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[Sample]:
        """An instant query; raises PromQLError when Prometheus rejects it. Returns the vector's samples
        (a scalar result comes back as one sample without labels)."""
        params: dict[str, str] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self._api("query", params)
        if data["resultType"] == "vector":
            result: list[Sample] = data["result"]
            return result
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        raise PromQLError(f"{expr}: unexpected result type {data['resultType']}")

    def label_values(self, label: str, match: str | None = None) -> list[str]:
        """What Grafana's label_values(match, label) variable query lists."""
        params = {"match[]": match} if match else None
        values: list[str] = self._api(f"label/{label}/values", params)
        return values

    def targets(self) -> list[dict[str, Any]]:
        active: list[dict[str, Any]] = self._api("targets", {"state": "active"})["activeTargets"]
        return active

    def rules(self) -> list[dict[str, Any]]:
        """Every rule of every loaded group, with its health, lastError and state."""
        return [rule for group in self._api("rules")["groups"] for rule in group["rules"]]

    def alerts(self) -> list[dict[str, Any]]:
        """Active alerts (pending or firing) with their labels."""
        alerts: list[dict[str, Any]] = self._api("alerts")["alerts"]
        return alerts

    def wait_for_targets_up(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        targets: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            targets = self.targets()
            if targets and all(t["health"] == "up" for t in targets):
                return
            time.sleep(0.25)
        states = [(t["scrapeUrl"], t["health"], t.get("lastError")) for t in targets]
        raise AssertionError(f"targets not all up after {timeout} s: {states}")

    def wait_for(self, expr: str, timeout: float = 20.0, interval: float = 0.5) -> list[Sample]:
        """Poll an instant query until it returns at least one sample."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"no series after {timeout} s for: {expr}")
            time.sleep(interval)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def running_prometheus(
    targets: Sequence[ScrapeTarget],
    rule_files: Sequence[Path] = (),
    scrape_interval: str = "1s",
    evaluation_interval: str = "1s",
    startup_timeout: float = 30.0,
) -> Iterator[Prometheus]:
    """Start `prometheus` on a free loopback port with a generated config and a throw-away TSDB; stop it
    (and remove its files) on exit. Raises RuntimeError if the binary is missing: callers skip first."""
    binary = prometheus_binary()
    if binary is None:
        raise RuntimeError(MISSING_REASON)
    with tempfile.TemporaryDirectory(prefix="switchyard-prometheus-") as tmp:
        workdir = Path(tmp)
        config = workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(render_config(targets, rule_files, scrape_interval, evaluation_interval)))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = workdir / "prometheus.log"
        with log.open("wb") as log_file:
            process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--storage.tsdb.retention.time=1h",
                    "--log.level=warn",
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = Prometheus(url, process, log)
        try:
            deadline = time.monotonic() + startup_timeout
            while not _ready(url):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"prometheus did not become ready: {log.read_text()[-2000:]}")
                time.sleep(0.1)
            yield server
        finally:
            server.close()
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)
