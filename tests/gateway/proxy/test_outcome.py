"""Bookkeeping after the answer: at once for an embedded app, in batches for `python -m gateway`. The batched
gateway's metrics are exact at every scrape, its access log lines come within FLUSH_S and tell when each request
ended (not when the batch was worked off), and a key's token charges still reach its budget."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from time import perf_counter

import httpx
import pytest
import uvloop

from gateway.fleet.registry import Registry
from gateway.metrics import Metrics
from gateway.proxy.access_log import Entry
from gateway.proxy.outcome import FLUSH_S, Outcome, Recorder
from tests.servers import GatewayServer, SimProcess, gateway, running_sims, sim, wait_until

CHAT = [{"role": "user", "content": "Count with me."}]
KEY = "sk-batch-0123456789"


@pytest.fixture(scope="module")
def upstream() -> Iterator[SimProcess]:
    with running_sims(sim("m")) as (server,):
        yield server


@pytest.fixture
def gw(upstream: SimProcess) -> Iterator[GatewayServer]:
    keys = [{"name": "batch", "key": KEY, "tokens_per_minute": 60}]  # each test starts with a full budget
    with gateway(upstream.url, batch_records=True, auth={"keys": keys}) as server:
        yield server


def ask(gw: GatewayServer, request_id: str, max_tokens: int = 3) -> httpx.Response:
    return httpx.post(
        gw.url + "/v1/chat/completions",
        json={"model": "m", "messages": CHAT, "max_tokens": max_tokens},
        headers={"Authorization": f"Bearer {KEY}", "X-Request-Id": request_id},
    )


def count(gw: GatewayServer, line_start: str) -> float:
    for line in httpx.get(gw.url + "/metrics").text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_scrape_counts_the_requests_still_waiting_in_the_batch(gw: GatewayServer) -> None:
    requests = 'switchyard_requests_total{code="200",model="m",route="/v1/chat/completions"}'
    completion = 'switchyard_tokens_total{kind="completion",model="m"}'
    before_requests, before_tokens = count(gw, requests), count(gw, completion)
    for i in range(3):
        assert ask(gw, f"scrape-{i}", max_tokens=2).status_code == 200
    # scraped at once, well inside FLUSH_S of the last answer: the scrape works the batch off first
    assert count(gw, requests) == before_requests + 3
    assert count(gw, completion) == before_tokens + 6


def test_log_lines_come_within_the_flush_interval(gw: GatewayServer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="switchyard.access"):
        assert ask(gw, "logged-late").status_code == 200
        wait_until(lambda: "logged-late" in caplog.text, 10 * FLUSH_S + 1, what="the batched access log line")
    record = next(r for r in caplog.records if "logged-late" in r.getMessage())
    line = json.loads(record.getMessage())
    assert line["completion_tokens"] == 3
    assert line["status"] == 200


def test_token_charges_reach_the_keys_budget(gw: GatewayServer) -> None:
    # 60 tokens a minute: a few answers use it up once their charges are worked off
    statuses = []
    for i in range(12):
        statuses.append(ask(gw, f"budget-{i}", max_tokens=8).status_code)
        time.sleep(FLUSH_S * 2)
    assert 429 in statuses
    assert statuses[0] == 200


class Entries:
    """An access log that keeps the entries it is given."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []

    def write(self, entry: Entry) -> None:
        self.entries.append(entry)

    def flush(self) -> None:
        pass


def test_a_batched_entry_is_stamped_with_when_its_request_ended() -> None:
    async def main() -> None:
        log = Entries()
        recorder = Recorder(Metrics(Registry()), log, batch=True)
        started = perf_counter()
        outcome = Outcome(b"r1", started, status=200, usage_tail=b'{"usage":{"prompt_tokens":5,"completion_tokens":2}}')
        ended = time.time()
        recorder.record("m", "/v1/completions", outcome, perf_counter() - started, None)
        assert log.entries == []  # nothing on the request path
        await asyncio.sleep(FLUSH_S * 3)
        assert len(log.entries) == 1
        entry = log.entries[0]
        assert abs(entry[0] - ended) < 0.01  # not the flush, FLUSH_S later
        assert (entry[8], entry[9]) == (5, 2)  # the usage, parsed from the tail in the batch

    uvloop.run(main())


def test_an_embedded_app_accounts_at_once() -> None:
    log = Entries()
    recorder = Recorder(Metrics(Registry()), log)
    recorder.record("m", "/v1/completions", Outcome(b"r2", perf_counter(), status=200), 0.01, None)
    assert len(log.entries) == 1
