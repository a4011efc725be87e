"""`switchyard up` and its stack file: parsing, and the --sim stack run as a real process tree."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.servers import wait_until
from worker.procs import free_port_block, http_get, http_ok
from worker.stack import gateway_config, worker_argv
from worker.stack_file import StackFileError, demo_stack, load_stack, parse_stack

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "stack.yaml"


def test_the_example_stack_file_is_valid_and_expands_the_models_dir() -> None:
    spec = load_stack(EXAMPLE, Path("/m"))
    chat, embed = spec.workers
    assert chat.model == "/m/smollm2-135m-instruct"
    assert chat.loras == {"lora-a": "/m/lora-a", "lora-b": "/m/lora-b"}
    assert chat.names == ["smollm2", "lora-a", "lora-b"]
    assert embed.base_url == "http://127.0.0.1:8002"
    assert chat.kv_events
    assert not embed.kv_events
    assert gateway_config(spec) == {
        "model_refresh_interval": 2,
        "backends": [{"url": "http://127.0.0.1:8001"}, {"url": "http://127.0.0.1:8002"}],
    }


def test_worker_argv_for_vllm_and_for_the_simulator() -> None:
    chat = demo_stack(Path("/m")).workers[0]
    real = worker_argv(chat, sim=False)
    assert real[1:5] == ["-m", "worker", "--model", "/m/smollm2-135m-instruct"]
    assert "--lora" in real
    assert real[real.index("--") :][:3] == ["--", "--max-lora-rank", "8"]
    assert "--tool-call-parser" in real
    fake = worker_argv(chat, sim=True)
    assert fake[1:3] == ["-m", "worker.sim"]
    assert "--max-lora-rank" not in fake


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "expected a mapping"),
        ({}, "workers"),
        ({"workers": [{"name": "a"}]}, "either `url`"),
        ({"workers": [{"name": "a", "model": "m", "port": 1, "url": "http://x"}]}, "not both"),
        ({"workers": [{"name": "a", "model": "m", "port": 1, "prot": 2}]}, "workers.0.prot"),
        ({"workers": [{"name": "a", "model": "m", "port": 8000}]}, "ports must be unique"),
        ({"workers": [{"name": "a", "url": "http://x"}, {"name": "a", "url": "http://y"}]}, "names must be unique"),
        ({"gateway": {"port": 0}, "workers": [{"name": "a", "url": "http://x"}]}, "gateway.port"),
    ],
)
def test_bad_stack_files_name_the_problem(data: object, message: str) -> None:
    with pytest.raises(StackFileError, match=message):
        parse_stack(data, Path("/m"))


def test_unreadable_and_invalid_yaml_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(StackFileError, match="cannot read"):
        load_stack(tmp_path / "missing.yaml", Path("/m"))
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"workers: [] # caf\xe9\n")
    with pytest.raises(StackFileError, match="cannot read stack file"):
        load_stack(latin1, Path("/m"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("workers: [\n")
    with pytest.raises(StackFileError, match="invalid YAML"):
        load_stack(bad, Path("/m"))


def _children(pid: int) -> set[int]:
    """Every descendant pid of pid (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_up_sim_serves_the_demo_topology_and_stops_every_child(tmp_path: Path, sig: signal.Signals) -> None:
    port = free_port_block(3)
    argv = [sys.executable, "-m", "worker.stack", "--sim", "--port", str(port), "--log-dir", str(tmp_path)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_ok(f"{url}/ready"), 30, what="gateway ready")
        wait_until(lambda: len(_children(proc.pid)) >= 3, 10, what="children")
        body = http_get(f"{url}/v1/models")
        assert body is not None
        models = {m["id"]: m for m in json.loads(body)["data"]}
        assert set(models) >= {"smollm2", "lora-a", "lora-b", "minilm"}
        assert models["lora-a"]["parent"] == "smollm2"
        children = _children(proc.pid)
        time.sleep(1.5)  # let the banner be printed
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert f"Switchyard is up at {url}" in out
        # stdout is a pipe: plain progress lines, one per phase change, nothing redrawn
        assert "\x1b[" not in out
        assert "\r" not in out
        for name in ("chat", "embed"):
            assert re.search(rf"^\[ *\d+ s\] {name}: starting\n(.*\n)*\[ *\d+ s\] {name}: ready$", out, re.M), out
        assert re.search(r"^\[ *\d+ s\] gateway: ready, serving 4 model\(s\)$", out, re.M), out
        assert "curl -s" in out
        assert "from openai import OpenAI" in out
        assert not [pid for pid in children if _alive(pid)], "orphaned children"
        assert not http_ok(f"{url}/health")
        assert yaml.safe_load((tmp_path / "gateway.yaml").read_text())["backends"]
    finally:
        if proc.poll() is None:
            proc.kill()


def test_up_refuses_ports_in_use(tmp_path: Path) -> None:
    port = free_port_block(3)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", port + 1))
        blocker.listen()
        result = subprocess.run(
            [sys.executable, "-m", "worker.stack", "--sim", "--port", str(port), "--log-dir", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 1
    assert f"chat ({port + 1})" in result.stderr
    assert "already in use" in result.stderr


def test_up_reports_a_worker_that_dies_while_starting(tmp_path: Path) -> None:
    stack_file = tmp_path / "stack.yaml"
    port = free_port_block(2)
    stack_file.write_text(
        yaml.safe_dump(
            {
                "gateway": {"port": port},
                "workers": [{"name": "bad", "model": "m", "port": port + 1, "sim_args": ["--no-such-flag"]}],
            }
        )
    )
    argv = [sys.executable, "-m", "worker.stack", "--sim", "--stack", str(stack_file), "--log-dir", str(tmp_path)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert "bad exited with code 2 while starting (after" in result.stderr
    assert re.search(r"^\[ *\d+ s\] bad: failed: exited with code 2 while starting$", result.stdout, re.M)
    assert "--no-such-flag" in result.stderr  # the tail of its log


def test_up_without_vllm_says_how_to_get_it(tmp_path: Path) -> None:
    # vLLM hidden from this one process (a None entry in sys.modules makes find_spec answer None), so the
    # test runs whether or not vLLM is installed here.
    hide = "import sys; sys.modules['vllm'] = None; from worker.stack import main; sys.exit(main(sys.argv[1:]))"
    result = subprocess.run(
        [sys.executable, "-c", hide, "--models-dir", str(tmp_path), "--port", str(free_port_block(3))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "scripts/setup.sh" in result.stderr
    assert "--sim" in result.stderr
