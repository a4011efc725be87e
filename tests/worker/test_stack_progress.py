"""Startup progress of a real stack of processes: the gateway, the worker launcher, and in place of vLLM a
stand-in that prints a real vLLM startup log line by line (pausing at each step) and then serves /health and
/v1/models, so every phase is seen the way `switchyard up` sees a real vLLM. Real vLLM: tests/e2e."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest
from rich.console import Console

from tests.worker.vllm_startup_log import EMBED_PHASES, EMBED_STARTUP
from worker.procs import free_port_block
from worker.stack import Stack, StackError
from worker.stack_file import GatewaySpec, StackSpec, WorkerSpec
from worker.startup_view import PlainView, RichView, StartupView

REPLAY = r"""
import http.server, json, os, sys, time
argv = sys.argv[1:]
port = int(argv[argv.index("--port") + 1])
names = argv[argv.index("--served-model-name") + 1 : argv.index("--host")]
pauses = os.environ["REPLAY_PAUSE_AT"].split(";")
fail_at = os.environ.get("REPLAY_FAIL_AT")
for line in open(os.environ["REPLAY_LOG"]).read().splitlines():
    print(line, flush=True)
    if fail_at and fail_at in line:
        sys.exit(1)
    if any(p in line for p in pauses):
        time.sleep(1.5)  # longer than the stack's poll: each step is seen
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        cards = [{"id": n, "object": "model", "parent": None} for n in names]
        body = json.dumps({"object": "list", "data": cards}).encode() if self.path == "/v1/models" else b""
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"""
PAUSE_AT = "Initializing a V1 LLM engine;Starting to load model;Warming up model;Starting vLLM server on"


def _stack(tmp_path: Path, fail_at: str | None = None) -> Stack:
    script, log = tmp_path / "replay.py", tmp_path / "vllm-startup.log"
    script.write_text(REPLAY)
    log.write_text("\n".join(EMBED_STARTUP[1:]) + "\n")  # the launcher prints its own first line
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nshift 2\nexec {sys.executable} {script} "$@"\n')  # drops "-m module"
    python.chmod(0o755)
    env = {"SWITCHYARD_WORKER_VLLM_PYTHON": str(python), "SWITCHYARD_WORKER_ENGINE": "cpu"}
    env |= {"REPLAY_LOG": str(log), "REPLAY_PAUSE_AT": PAUSE_AT, **({"REPLAY_FAIL_AT": fail_at} if fail_at else {})}
    port = free_port_block(2)
    worker = WorkerSpec(name="embed", model="/m/embed", served_model_names=["minilm"], port=port + 1, env=env)
    spec = StackSpec(gateway=GatewaySpec(port=port, settings={"model_refresh_interval": 0.5}), workers=[worker])
    return Stack(spec, tmp_path / "logs")


def _run(stack: Stack, view: StartupView) -> None:
    try:
        stack.start()
        with view:
            stack.wait_ready(60, view)
    finally:
        stack.stop()


def test_plain_progress_is_one_line_per_phase_of_the_vllm_log(tmp_path: Path) -> None:
    out = io.StringIO()
    _run(_stack(tmp_path), PlainView(out))
    lines = out.getvalue().splitlines()
    embed = [line.split("] embed: ", 1)[1] for line in lines if "] embed: " in line]
    assert embed == ["starting", *EMBED_PHASES, "ready"]
    gateway = [line.split("] gateway: ", 1)[1] for line in lines if "] gateway: " in line]
    assert gateway[-1] == "ready, serving 1 model(s)"
    assert all(re.fullmatch(r"\[ *\d+ s\] (embed|gateway): .+", line) for line in lines), lines


def test_rich_progress_shows_the_same_phases_on_a_terminal(tmp_path: Path) -> None:
    out = io.StringIO()
    _run(_stack(tmp_path), RichView(Console(file=out, force_terminal=True, width=100)))
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())
    for phase in EMBED_PHASES:
        assert re.search(rf"embed\s+\d+ s {re.escape(phase)}", plain), phase
    assert re.search(r"✓ embed\s+\d+ s ready", plain)
    assert re.search(r"✓ gateway\s+\d+ s ready, serving 1 model\(s\)", plain)


def test_a_worker_that_dies_is_one_clear_line_with_its_phase_and_log_tail(tmp_path: Path) -> None:
    out = io.StringIO()
    with pytest.raises(StackError) as failure:
        _run(_stack(tmp_path, fail_at="Starting to load model"), PlainView(out))
    message = str(failure.value)
    first, *tail = message.splitlines()
    assert re.fullmatch(
        r"embed exited with code 1 while loading weights \(after \d+ s\); last lines of \S+embed\.log:", first
    )
    assert any("Starting to load model /models/all-minilm-l6-v2" in line for line in tail)
    assert "vLLM exited with code 1 before becoming healthy" in tail[-1]  # the launcher's own last word
    assert re.search(r"\] embed: failed: exited with code 1 while loading weights$", out.getvalue(), re.M)
