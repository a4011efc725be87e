"""Real servers on loopback ports for tests: the gateway under uvicorn (in a thread, so tests can look at
its registry) and simulator processes (`python -m worker.sim`)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn

from gateway.app import create_app
from gateway.fleet.registry import Registry
from gateway.http.protocol import protocol_class
from gateway.settings import load_settings
from worker.procs import free_port_block


def free_port() -> int:
    return free_port_block(1)


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.02, what: str = "condition") -> None:
    """Poll `predicate` until it is true. Errors it raises count as "not yet" (a server still starting), but the
    last one is raised with the timeout, so a broken predicate does not pass for a slow condition."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception as exc:
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}") from last


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class SimProcess:
    """`python -m worker.sim` in a child process (its own process group, so kill -9 takes it whole)."""

    args: list[str]
    port: int
    count: int = 1
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{self.port + i}" for i in range(self.count)]

    def start(self, wait_healthy: bool = True) -> SimProcess:
        if self.count > 1:
            argv = [*self.args, "--count", str(self.count), "--port-base", str(self.port)]
        else:
            argv = [*self.args, "--port", str(self.port)]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker.sim", "--host", "127.0.0.1", *argv],
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        ports = [self.port + i for i in range(self.count)]
        wait_until(lambda: all(_listening(p) for p in ports) or self.process.poll() is not None, 30, what="sim")
        self._raise_if_exited()
        if wait_healthy:
            wait_until(lambda: self.process.poll() is not None or self._healthy(), 30, what="health")
            self._raise_if_exited()  # it died after listening: say why, not "timed out"
        return self

    def _healthy(self) -> bool:
        return all(httpx.get(f"{u}/health").status_code == 200 for u in self.urls())

    def _raise_if_exited(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            stderr = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
            raise RuntimeError(f"simulator exited with {self.process.returncode}: {stderr}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()

    def metric(self, name: str, port: int | None = None) -> float:
        """Sum of a sample's values across label sets on one server's /metrics."""
        text = httpx.get(f"http://127.0.0.1:{port or self.port}/metrics").text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and line[len(name)] in "{ ":
                total += float(line.rsplit(" ", 1)[1])
        return total


@contextlib.contextmanager
def running_sims(*sims: SimProcess) -> Iterator[tuple[SimProcess, ...]]:
    try:
        for sim in sims:
            sim.start()
        yield sims
    finally:
        for sim in sims:
            sim.stop()


def sim(model: str, *extra: str, count: int = 1, fast: bool = True) -> SimProcess:
    """A simulator definition serving `model`; `fast` makes generation quick for functional tests."""
    timing = ["--prefill-ms-per-token", "0.01", "--decode-ms-per-token", "2"] if fast else []
    return SimProcess(["--served-model-name", model, *timing, *extra], port=free_port_block(count), count=count)


class ThreadedServer:
    """An ASGI app under a real uvicorn (httptools, uvloop) in a background thread, on a loopback port."""

    def __init__(self, app: Any, port: int | None = None, http: Any = "httptools", keep_alive: int = 5) -> None:
        self.port = port or free_port()
        self.app = app
        self._server = uvicorn.Server(
            uvicorn.Config(
                app,
                host="127.0.0.1",
                port=self.port,
                loop="uvloop",
                http=http,
                lifespan="on",
                access_log=False,
                log_level="warning",
                timeout_keep_alive=keep_alive,
            )
        )
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ThreadedServer:
        self._thread.start()
        wait_until(lambda: self._server.started, 15, what="server start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(15)


class GatewayServer(ThreadedServer):
    """create_app(settings) served for real, by the gateway's own server protocol as `python -m gateway` serves
    it (`asgi_server=True`: by uvicorn's, as an app embedded in another ASGI server is); tests may read its
    registry."""

    def __init__(self, config: dict[str, Any], asgi_server: bool = False, batch_records: bool = False) -> None:
        settings = load_settings(None, **config)
        limits = settings.limits
        http = (
            "httptools"
            if asgi_server
            else protocol_class(limits.header_timeout, limits.max_header_count, limits.max_header_bytes)
        )
        super().__init__(
            create_app(settings, batch_records=batch_records), http=http, keep_alive=limits.keep_alive_timeout
        )

    @property
    def registry(self) -> Registry:
        registry: Registry = self.app.registry
        return registry

    def __enter__(self) -> GatewayServer:
        super().__enter__()
        return self


def gateway(*backends: str, asgi_server: bool = False, batch_records: bool = False, **config: Any) -> GatewayServer:
    config.setdefault("model_refresh_interval", 0.2)
    backend_list = [{"url": url} for url in backends]
    return GatewayServer({"backends": backend_list, **config}, asgi_server=asgi_server, batch_records=batch_records)
