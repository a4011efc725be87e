"""Fault flags, client disconnects, `--count` and the command line, over real sockets."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time

import httpx
import orjson
import pytest

from tests.worker.sim.conftest import RunningSim, SimFactory, sim_process
from worker.sim.cli import main as cli_main

STREAM = {"model": "sim", "prompt": "tell me", "max_tokens": 500, "ignore_eos": True, "stream": True}


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(name)


async def read_events(http: httpx.AsyncClient, payload: dict[str, object], limit_s: float) -> tuple[list[str], str]:
    """SSE data lines received until the stream ends, errors or `limit_s` passes; and how it ended."""
    events: list[str] = []
    try:
        async with asyncio.timeout(limit_s), http.stream("POST", "/v1/completions", json=payload) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
        return events, "complete"
    except TimeoutError:
        return events, "timeout"
    except httpx.RemoteProtocolError:
        return events, "dropped"


async def test_disconnect_aborts_within_100ms(sim: RunningSim) -> None:
    async with httpx.AsyncClient(base_url=sim.url) as http:
        async with http.stream("POST", "/v1/completions", json=STREAM) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    break
            running = metric((await http.get("/metrics")).text, "vllm:num_requests_running")
        closed_at = time.monotonic()
        while metric((await http.get("/metrics")).text, "vllm:num_requests_running") > 0:
            assert time.monotonic() - closed_at < 0.1, "the aborted request still holds its batch slot"
            await asyncio.sleep(0.005)
        text = (await http.get("/metrics")).text
    assert running == 1
    assert 'finished_reason="abort"' in text
    assert metric(text, 'vllm:request_success_total{engine="0",finished_reason="abort"') == 1


async def test_stall_after_tokens(sim_factory: SimFactory) -> None:
    async with sim_factory(stall_after_tokens=2) as sim, httpx.AsyncClient(base_url=sim.url) as http:
        events, ended = await read_events(http, STREAM, 0.4)
    assert ended == "timeout"
    assert len(events) == 2
    assert "[DONE]" not in events


async def test_drop_after_tokens(sim_factory: SimFactory) -> None:
    async with sim_factory(drop_after_tokens=3) as sim, httpx.AsyncClient(base_url=sim.url) as http:
        events, ended = await read_events(http, STREAM, 5)
    assert ended == "dropped"
    assert len(events) == 3
    assert "[DONE]" not in events


async def test_drop_cuts_non_streamed_body(sim_factory: SimFactory) -> None:
    async with sim_factory(drop_after_tokens=0) as sim, httpx.AsyncClient(base_url=sim.url) as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 3})


VLLM_STREAM_ERROR = (
    b'data: {"error": {"message": "Internal server error", "type": "InternalServerError", "param": null, '
    b'"code": 500}}\n\ndata: [DONE]\n\n'
)  # what vLLM 0.32 sends when generation fails after the 200 (json.dumps spacing)


async def test_error_after_tokens_sends_vllms_error_event(sim_factory: SimFactory) -> None:
    async with sim_factory(error_after_tokens=3) as sim, httpx.AsyncClient(base_url=sim.url) as http:
        r = await http.post("/v1/completions", json=STREAM)
        short = await http.post("/v1/completions", json={**STREAM, "max_tokens": 3})
        text = (await http.get("/metrics")).text
    assert r.status_code == 200
    assert r.content.endswith(b"\n\n" + VLLM_STREAM_ERROR)
    events = r.content.split(b"\n\n")[:-1]
    assert len(events) == 3 + 2  # three tokens, the error, [DONE]
    assert all(orjson.loads(e[6:])["choices"][0]["text"] for e in events[:3])
    assert short.content.endswith(b"data: [DONE]\n\n")  # no fourth token due: no error
    assert b"error" not in short.content
    assert metric(text, 'vllm:request_success_total{engine="0",finished_reason="error"') == 1
    assert metric(text, "vllm:num_requests_running") == 0


async def test_error_after_zero_tokens_opens_the_chat_stream_first(sim_factory: SimFactory) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True}
    async with sim_factory(error_after_tokens=0) as sim, httpx.AsyncClient(base_url=sim.url) as http:
        r = await http.post("/v1/chat/completions", json=body)
    events = r.content.split(b"\n\n")[:-1]
    assert orjson.loads(events[0][6:])["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert r.content == events[0] + b"\n\n" + VLLM_STREAM_ERROR


async def test_error_after_tokens_non_streamed_is_a_500(sim_factory: SimFactory) -> None:
    async with sim_factory(error_after_tokens=2) as sim, httpx.AsyncClient(base_url=sim.url) as http:
        r = await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 5, "ignore_eos": True})
        ok = await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "ignore_eos": True})
    assert r.status_code == 500
    assert r.json() == {"error": {"message": "Internal server error", "type": "InternalServerError", "param": None,
                                  "code": 500}}  # fmt: skip
    assert ok.status_code == 200


def _sync_stream(url: str, body: dict[str, object]) -> tuple[list[bytes], str]:
    """The SSE data lines of a stream, and whether it completed or the connection broke."""
    got: list[bytes] = []
    try:
        with httpx.stream("POST", url, json=body, timeout=10) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    got.append(line.encode())
    except httpx.RemoteProtocolError:
        return got, "dropped"
    return got, "complete"


def test_exit_after_tokens_kills_the_process_mid_stream() -> None:
    with sim_process("--served-model-name", "sim", "--port", "0", "--decode-ms-per-token", "5",
                     "--exit-after-tokens", "4") as sim:  # fmt: skip
        url = sim.urls[0]
        got, ended = _sync_stream(url + "/v1/completions", {**STREAM, "max_tokens": 50})
        assert sim.proc.wait(5) == 1
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=2)
    assert ended == "dropped"
    assert len(got) == 4  # exactly N whole token events, then the connection is gone: no [DONE], no error event
    assert all(orjson.loads(e[6:])["choices"][0]["finish_reason"] is None for e in got)


def test_exit_after_tokens_non_streamed() -> None:
    with sim_process("--served-model-name", "m", "--port", "0", "--decode-ms-per-token", "1",
                     "--exit-after-tokens", "2") as sim:  # fmt: skip
        url = sim.urls[0]
        short = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=5)
        with pytest.raises(httpx.TransportError):
            httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 9, "ignore_eos": True}, timeout=5)
        assert sim.proc.wait(5) == 1
    assert short.status_code == 200


async def test_fail_rate(sim_factory: SimFactory) -> None:
    async with sim_factory(fail_rate=1.0, fail_status=503) as sim, httpx.AsyncClient(base_url=sim.url) as http:
        r = await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        stream = await http.post("/v1/completions", json={**STREAM, "max_tokens": 2})
        health = await http.get("/health")
    assert r.status_code == 503
    assert r.json()["error"]["code"] == 503
    assert stream.status_code == 503
    assert health.status_code == 200


async def test_partial_fail_rate(sim_factory: SimFactory) -> None:
    async with sim_factory(fail_rate=0.5, seed=1) as sim, httpx.AsyncClient(base_url=sim.url) as http:
        codes = [(await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})).status_code
                 for _ in range(40)]  # fmt: skip
    assert set(codes) == {200, 500}
    assert 8 <= codes.count(500) <= 32


async def test_slow_start(sim_factory: SimFactory) -> None:
    async with sim_factory(slow_start_s=0.3) as sim, httpx.AsyncClient(base_url=sim.url) as http:
        early = [(await http.get(p)).status_code for p in ("/health", "/v1/models")]
        await asyncio.sleep(0.35)
        late = [(await http.get(p)).status_code for p in ("/health", "/v1/models")]
    assert early == [503, 503]
    assert late == [200, 200]


async def test_queue_shows_in_metrics(sim_factory: SimFactory) -> None:
    async with sim_factory(max_num_seqs=1) as sim, httpx.AsyncClient(base_url=sim.url) as http:
        payload = {"prompt": "x", "max_tokens": 20, "ignore_eos": True}
        jobs = [asyncio.create_task(http.post("/v1/completions", json=payload)) for _ in range(3)]
        await asyncio.sleep(0.01)
        text = (await http.get("/metrics")).text
        await asyncio.gather(*jobs)
    assert metric(text, "vllm:num_requests_running") == 1
    assert metric(text, "vllm:num_requests_waiting") == 2


def test_exit_after_requests() -> None:
    with sim_process("--served-model-name", "m", "--port", "0", "--decode-ms-per-token", "1",
                     "--exit-after-requests", "2") as sim:  # fmt: skip
        url = sim.urls[0]
        answers = [httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=5)
                   for _ in range(2)]  # fmt: skip
        assert sim.proc.wait(5) == 1  # gone right after the 2nd answer, with no further request
        with pytest.raises(httpx.TransportError):
            httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=5)
    assert [a.status_code for a in answers] == [200, 200]


def _free_port_run(count: int) -> int:
    for base in range(23000, 60000, 97):
        socks = []
        try:
            for i in range(count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port run")


def test_count_runs_independent_servers() -> None:
    base = _free_port_run(3)
    with sim_process("--served-model-name", "m", "--count", "3", "--port-base", str(base),
                     "--decode-ms-per-token", "1", count=3) as sim:  # fmt: skip
        assert sim.urls == [f"http://127.0.0.1:{base + i}" for i in range(3)]
        httpx.post(sim.urls[1] + "/v1/completions", json={"prompt": "x", "max_tokens": 4}, timeout=5)
        tokens = [metric(httpx.get(u + "/metrics").text, "vllm:generation_tokens_total") for u in sim.urls]
        models = [httpx.get(u + "/v1/models").json()["data"][0]["id"] for u in sim.urls]
    assert tokens == [0, 4, 0]
    assert models == ["m", "m", "m"]


def test_cli_rejects_bad_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["--served-model-name", "m", "--fail-rate", "2"]) == 2
    assert "fail_rate" in capsys.readouterr().err
    assert cli_main(["--served-model-name", "m", "--count", "2", "--port", "0"]) == 2


def test_busy_port_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli_main(["--served-model-name", "m", "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_help_documents_every_flag() -> None:
    out = subprocess.run([sys.executable, "-m", "worker.sim", "--help"], capture_output=True, text=True, check=True)
    for flag in ("--embedding-dim", "--max-model-len", "--api-key", "--seed", "--lora-load-ms",
                 "--decode-batch-factor", "--allow-runtime-lora", "--fail-rate", "--fail-status",
                 "--stall-after-tokens", "--drop-after-tokens", "--exit-after-requests", "--slow-start",
                 "--exit-after-tokens", "--error-after-tokens", "--positional-output", "--kv-events-config",
                 "--enable-prefix-caching", "--enable-prompt-tokens-details", "--kv-hash-seed",
                 "--server-dev-mode"):  # fmt: skip
        assert flag in out.stdout


async def test_prefix_cache_over_http(sim_factory: SimFactory) -> None:
    prompt = "a shared system prompt, long enough to fill many blocks. " * 30  # ~430 tokens
    body = {"prompt": prompt, "max_tokens": 1}
    async with sim_factory(prefill_ms_per_token=0.5) as sim, httpx.AsyncClient(base_url=sim.url) as http:
        times = []
        for _ in range(2):
            started = time.perf_counter()
            assert (await http.post("/v1/completions", json=body)).status_code == 200
            times.append(time.perf_counter() - started)
        text = (await http.get("/metrics")).text
    assert metric(text, "vllm:prefix_cache_hits_total") > 400
    assert times[0] > 0.2
    assert times[1] < times[0] / 3


async def test_lora_slot_wait_shows_in_metrics(sim_factory: SimFactory) -> None:
    """With one LoRA slot, `b` waits while `a` runs, and the metrics say so. `a` is sent first and seen running
    before `b` is sent, and the metrics are read until the wait shows (not after a fixed sleep: on a loaded
    machine the requests may not have reached the engine yet)."""
    expected = 'vllm:lora_requests_info{max_lora="1",running_lora_adapters="a",waiting_lora_adapters="b"}'
    async with (
        sim_factory(max_loras=1, loras={"a": "/a", "b": "/b"}) as sim,
        httpx.AsyncClient(base_url=sim.url) as http,
    ):

        async def metrics_until(line: str, jobs: list[asyncio.Task[httpx.Response]]) -> bool:
            while not all(job.done() for job in jobs):
                if line in (await http.get("/metrics")).text:
                    return True
                await asyncio.sleep(0.005)
            return False

        def send(model: str) -> asyncio.Task[httpx.Response]:
            payload = {"model": model, "prompt": "x", "max_tokens": 40, "ignore_eos": True}
            return asyncio.create_task(http.post("/v1/completions", json=payload))

        first = send("a")
        assert await metrics_until('running_lora_adapters="a"', [first]), "`a` finished before it was seen running"
        second = send("b")
        seen = await metrics_until(expected, [first, second])
        results = await asyncio.gather(first, second)
    assert [r.status_code for r in results] == [200, 200]
    assert seen, f"never saw {expected} while the requests ran"


def test_lora_flags_and_switchyard_entry() -> None:
    from gateway.cli import main as switchyard_main
    from worker.sim.cli import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args(["--served-model-name", "m", "--lora", "a=/p/a", "--lora", "b"]))
    assert cfg.loras == {"a": "/p/a", "b": "/sim/loras/b"}
    assert switchyard_main(["sim", "--served-model-name", "m", "--max-num-seqs", "0"]) == 2
