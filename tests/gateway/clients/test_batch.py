"""`switchyard batch` over real sockets: the gateway and simulators run as processes (as `switchyard up --sim`
starts them), the batch command runs as a process too, so crashes and kills are real."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from gateway.clients.batch import RichProgress, finished_ids, parse_input
from worker.procs import free_port_block
from worker.stack import Stack
from worker.stack_file import GatewaySpec, StackSpec, WorkerSpec

FAST = ["--prefill-ms-per-token", "0.01", "--decode-ms-per-token", "1"]


def _stack(tmp: Path, chat_args: list[str]) -> Stack:
    port = free_port_block(3)
    spec = StackSpec(
        gateway=GatewaySpec(port=port, settings={"model_refresh_interval": 0.5}),
        workers=[
            WorkerSpec(name="chat", model="chat", port=port + 1, loras={"chat-lora": "x"}, sim_args=chat_args),
            WorkerSpec(name="embed", model="embed", port=port + 2, sim_args=FAST),
        ],
    )
    stack = Stack(spec, tmp / "logs", sim=True)
    try:
        stack.start()
        stack.wait_ready(60)
    except BaseException:
        stack.stop()
        raise
    return stack


@pytest.fixture(scope="module")
def gateway_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    stack = _stack(tmp_path_factory.mktemp("batch"), FAST)
    yield stack.url
    stack.stop()


def _line(custom_id: str, url: str = "/v1/chat/completions", **body: Any) -> str:
    if not body:
        body = {"model": "chat", "messages": [{"role": "user", "content": f"hi {custom_id}"}], "max_tokens": 8}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def _batch(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "gateway.clients.batch", *args], capture_output=True, text=True, timeout=120, check=False
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_line_gets_exactly_one_result(gateway_url: str, tmp_path: Path) -> None:
    lines = [_line(f"chat-{i}") for i in range(20)]
    lines += [_line(f"emb-{i}", "/v1/embeddings", model="embed", input=f"text {i}") for i in range(5)]
    lines.append(_line("lora", model="chat-lora", messages=[{"role": "user", "content": "x"}], max_tokens=4))
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(lines) + "\n")
    result = _batch(str(src), "--output", str(out), "--gateway", gateway_url, "--concurrency", "4", check=True)
    rows = _read(out)
    assert sorted(r["custom_id"] for r in rows) == sorted(json.loads(line)["custom_id"] for line in lines)
    for row in rows:
        assert row["error"] is None
        assert row["id"].startswith("batch_req_")
        assert row["response"]["status_code"] == 200
        assert row["response"]["request_id"]
    by_id = {r["custom_id"]: r for r in rows}
    assert by_id["emb-0"]["response"]["body"]["data"][0]["embedding"]
    assert by_id["lora"]["response"]["body"]["model"] == "chat-lora"
    assert "26 succeeded, 0 failed" in result.stdout


def test_a_rerun_skips_finished_lines(gateway_url: str, tmp_path: Path) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(_line(f"r-{i}") for i in range(6)) + "\n")
    _batch(str(src), "--output", str(out), "--gateway", gateway_url, check=True)
    first = out.read_text()
    result = _batch(str(src), "--output", str(out), "--gateway", gateway_url, check=True)
    assert out.read_text() == first
    assert "6 line(s) already" in result.stderr


def test_malformed_lines_are_reported_by_number_and_written_as_errors(gateway_url: str, tmp_path: Path) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(
        "\n".join(
            [
                _line("ok"),
                "{not json",
                json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": {}}),
                _line("ok"),
                json.dumps({"custom_id": "get", "method": "GET", "url": "/v1/models", "body": {}}),
                _line("stream", model="chat", messages=[], stream=True),
                json.dumps({"custom_id": "path", "method": "POST", "url": "chat", "body": {}}),
                "",
                "[1, 2]",
            ]
        )
        + "\n"
    )
    result = _batch(str(src), "--output", str(out), "--gateway", gateway_url)
    assert result.returncode == 1
    rows = {r["custom_id"]: r for r in _read(out)}
    assert rows["ok"]["response"]["status_code"] == 200
    for custom_id, line in [("line-2", 2), ("line-3", 3), ("line-4", 4), ("get", 5), ("stream", 6), ("path", 7)]:
        assert rows[custom_id]["response"] is None
        assert rows[custom_id]["error"]["code"] == "invalid_request"
        assert f"line {line}:" in rows[custom_id]["error"]["message"]
        assert f"line {line}:" in result.stderr
    assert "line 9:" in rows["line-9"]["error"]["message"]
    assert len(rows) == 8


def test_http_errors_are_results_not_retried(gateway_url: str, tmp_path: Path) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(_line("nope", model="no-such-model", messages=[{"role": "user", "content": "x"}]) + "\n")
    result = _batch(str(src), "--output", str(out), "--gateway", gateway_url)
    assert result.returncode == 1
    (row,) = _read(out)
    assert row["response"]["status_code"] == 404
    assert row["response"]["body"]["error"]["message"]


def test_connection_errors_are_retried_then_written_as_errors(tmp_path: Path) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(_line("a") + "\n" + _line("b") + "\n")
    dead = f"http://127.0.0.1:{free_port_block(1)}"
    started = time.monotonic()
    result = _batch(str(src), "--output", str(out), "--gateway", dead, "--max-attempts", "3")
    assert result.returncode == 1
    rows = _read(out)
    assert {r["custom_id"] for r in rows} == {"a", "b"}
    assert all(r["response"] is None and r["error"]["code"] == "connection_error" for r in rows)
    assert "after 3 attempts" in rows[0]["error"]["message"]
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("status", ["503", "429"])
def test_overload_answers_are_retried_until_they_succeed(tmp_path: Path, status: str) -> None:
    stack = _stack(tmp_path, [*FAST, "--fail-rate", "0.5", "--fail-status", status])
    try:
        src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
        src.write_text("\n".join(_line(f"x-{i}") for i in range(12)) + "\n")
        result = _batch(str(src), "--output", str(out), "--gateway", stack.url, "--max-attempts", "12", check=True)
        rows = _read(out)
        assert len(rows) == 12
        assert all(r["response"]["status_code"] == 200 for r in rows), result.stderr
    finally:
        stack.stop()


def test_a_killed_run_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    # Slow generation so the kill lands mid-run with requests in flight.
    stack = _stack(tmp_path, ["--decode-ms-per-token", "20", "--prefill-ms-per-token", "0.01"])
    try:
        src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
        ids = [f"k-{i}" for i in range(40)]
        body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 10, "model": "chat"}
        src.write_text("\n".join(_line(i, **body) for i in ids) + "\n")
        argv = [sys.executable, "-m", "gateway.clients.batch", str(src), "--output", str(out), "--gateway", stack.url]
        proc = subprocess.Popen([*argv, "--concurrency", "4"], stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 8):
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        partial = len(_read(out))
        assert 8 <= partial < len(ids)
        # Simulate the worst case too: a torn last line, as if the kill landed inside a write.
        with out.open("a") as f:
            f.write('{"id": "batch_req_torn", "custom_id": "k-')
        _batch(str(src), "--output", str(out), "--gateway", stack.url, check=True)
        rows = _read(out)
        assert sorted(r["custom_id"] for r in rows) == sorted(ids)
        assert all(r["response"]["status_code"] == 200 for r in rows)
    finally:
        stack.stop()


def test_sigint_stops_cleanly_and_resumes(gateway_url: str, tmp_path: Path) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    # 64 tokens at 1 ms each and two at a time: 300 lines take about 10 s, far longer than the interrupt needs.
    lines = [
        _line(f"s-{i}", messages=[{"role": "user", "content": "hi"}], max_tokens=64, ignore_eos=True, model="chat")
        for i in range(300)
    ]
    src.write_text("\n".join(lines) + "\n")
    argv = [sys.executable, "-m", "gateway.clients.batch", str(src), "--output", str(out), "--gateway", gateway_url]
    # SIGINT ignored on the way in, as a background job of a shell would start it: the interrupt must still work
    proc = subprocess.Popen(
        [*argv, "--concurrency", "2"],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 5):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130, "the batch finished before the interrupt landed"
    assert "rerun the same command to resume" in stdout
    _batch(*argv[3:], check=True)
    assert sorted(r["custom_id"] for r in _read(out)) == sorted(f"s-{i}" for i in range(300))


def test_parse_input_keeps_line_numbers() -> None:
    good, bad = parse_input([_line("a"), "", "nope", _line("a")])
    assert [r.custom_id for r in good] == ["a"]
    assert [(b.line, b.custom_id) for b in bad] == [(3, "line-3"), (4, "line-4")]
    assert "repeats an earlier line" in bad[1].message


def test_finished_ids_cuts_a_torn_last_line(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text('{"custom_id": "a"}\n{"custom_id": "b"}\n{"custom_id": "c')
    assert finished_ids(out) == {"a", "b"}
    assert out.read_text() == '{"custom_id": "a"}\n{"custom_id": "b"}\n'
    assert finished_ids(tmp_path / "missing.jsonl") == set()


def test_progress_through_a_pipe_is_a_plain_line_per_interval_and_a_last_one(gateway_url: str, tmp_path: Path) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    # 32 tokens at 1 ms each, two at a time: 40 lines take about a second, several progress intervals
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 32, "ignore_eos": True, "model": "chat"}
    src.write_text("\n".join(_line(f"p-{i}", **body) for i in range(40)) + "\n")
    args = ["--gateway", gateway_url, "--concurrency", "2", "--progress-every", "0.2"]
    result = _batch(str(src), "--output", str(out), *args, check=True)
    pattern = r"switchyard batch: (\d+)/40 done \((\d+) failed\), [\d.]+ req/s, \d+ s elapsed"
    lines = result.stderr.splitlines()
    matches = [re.fullmatch(pattern, line) for line in lines]
    assert all(matches), lines
    done = [int(m.group(1)) for m in matches if m]
    assert len(done) >= 3, lines
    assert done == sorted(done)
    assert done[-1] == 40
    assert "\r" not in result.stderr
    assert "\x1b[" not in result.stderr


def test_progress_on_a_terminal_is_a_live_bar() -> None:
    out = io.StringIO()
    progress = RichProgress(5, Console(file=out, force_terminal=True, width=120))
    for ok in (True, True, False, True):
        progress.add(ok)
        time.sleep(0.15)  # the bar redraws on its own between results
    progress.add(True)
    progress.close()
    text = out.getvalue()
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    assert "\x1b[" in text  # colours and cursor moves: redrawn in place
    assert "━" in plain  # the bar
    assert re.search(r"batch .*2/5 0 failed", plain)
    assert re.search(r"batch .*5/5 1 failed [\d.]+ req/s", plain)
