"""Startup progress of a real stack of processes: the gateway, the worker launcher, and in place of vLLM a
stand-in that prints a real vLLM startup log line by line (tests/worker/replay_vllm.py), so every phase is seen
the way `switchyard up` sees a real vLLM. Real vLLM: tests/e2e."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from rich.console import Console

from tests.worker.replay_vllm import replay_env
from tests.worker.vllm_startup_log import EMBED_PHASES
from worker.procs import free_port_block
from worker.stack import Stack, StackError
from worker.stack_file import GatewaySpec, StackSpec, WorkerSpec
from worker.startup_view import PlainView, RichView, StartupView


def _stack(tmp_path: Path, fail_at: str | None = None) -> Stack:
    port = free_port_block(2)
    env = replay_env(tmp_path, fail_at)
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
