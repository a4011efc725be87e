"""A steady client load in threads, each request classified: ok, a proper failure (an SSE error event
followed by [DONE], or a 5xx in the gateway's error shape), or an improper one (anything else)."""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

import httpx

from tests.resilience.support import is_error_event, is_gateway_error_body, sse_payloads

Verdict = Literal["ok", "error_event", "error_status", "improper"]


@dataclass(frozen=True)
class Result:
    started: float
    ended: float
    stream: bool
    verdict: Verdict
    detail: str = ""


def classify(response: httpx.Response, text: str, stream: bool) -> tuple[Verdict, str]:
    status = response.status_code
    if status != 200:
        if status in (502, 503, 504) and is_gateway_error_body(text):
            return "error_status", f"{status} {text[:200]}"
        return "improper", f"status {status}: {text[:300]}"
    if not stream:
        return ("ok", "") if '"choices"' in text else ("improper", f"200 without choices: {text[:300]}")
    payloads = sse_payloads(text)
    if not payloads or payloads[-1] != "[DONE]":
        return "improper", f"stream did not end with [DONE]: {text[-300:]!r}"
    errors = [p for p in payloads if is_error_event(p)]
    if not errors:
        return "ok", ""
    if len(errors) == 1 and payloads[-2] == errors[0]:
        return "error_event", errors[0][:200]
    return "improper", f"error event not last before [DONE]: {text[-300:]!r}"


@dataclass
class Load:
    """`workers` threads sending requests to `url` for `model` until stopped."""

    url: str
    model: str
    workers: int = 4
    max_tokens: int = 8
    stream_share: float = 0.5  # fraction of requests that stream
    results: list[Result] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _counter: itertools.count[int] = field(default_factory=itertools.count)

    def __enter__(self) -> Load:
        for index in range(self.workers):
            thread = threading.Thread(target=self._run, name=f"load-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
            assert not thread.is_alive(), "a load thread hung"

    def count(self) -> int:
        with self._lock:
            return len(self.results)

    def snapshot(self) -> list[Result]:
        with self._lock:
            return list(self.results)

    def _run(self) -> None:
        with httpx.Client(timeout=httpx.Timeout(10.0)) as client:
            while not self._stop.is_set():
                number = next(self._counter)
                stream = (number * 7919 % 100) < self.stream_share * 100
                body = {
                    "model": self.model,
                    "messages": [{"role": "user", "content": f"request {number}: how many wagons?"}],
                    "max_tokens": self.max_tokens,
                    "ignore_eos": True,
                    "stream": stream,
                }
                started = time.monotonic()
                try:
                    with client.stream("POST", self.url + "/v1/chat/completions", json=body) as response:
                        text = response.read().decode()
                    verdict, detail = classify(response, text, stream)
                except httpx.HTTPError as exc:
                    verdict, detail = "improper", f"{exc.__class__.__name__}: {exc}"
                with self._lock:
                    self.results.append(Result(started, time.monotonic(), stream, verdict, detail))
