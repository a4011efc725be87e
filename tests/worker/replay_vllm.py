"""A stand-in for vLLM under the real worker launcher: it prints a real vLLM startup log line by line, pausing
at each step, binds the KV event ports its --kv-events-config names (as vLLM's ZMQ sockets do, so two workers
given the same ports collide as they would), records its command line, then serves /health and /v1/models.

`replay_env(folder)` is the environment that makes a stack worker run it (the launcher's --vllm-python)."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.worker.vllm_startup_log import EMBED_STARTUP

REPLAY = r"""
import http.server, json, os, socket, sys, time
argv = sys.argv[1:]
with open(os.environ["REPLAY_RECORD"], "w") as record:
    json.dump(argv, record)
port = int(argv[argv.index("--port") + 1])
names = argv[argv.index("--served-model-name") + 1 : argv.index("--host")]
bound = []
if "--kv-events-config" in argv:
    config = json.loads(argv[argv.index("--kv-events-config") + 1])
    for endpoint in (config["endpoint"], config["replay_endpoint"]):
        sock = socket.socket()
        try:
            sock.bind(("0.0.0.0", int(endpoint.rsplit(":", 1)[1])))
        except OSError as exc:
            sys.exit(f"ZMQError: {exc} (addr='{endpoint}')")
        sock.listen()
        bound.append(sock)
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


def replay_env(folder: Path, fail_at: str | None = None, record: Path | None = None) -> dict[str, str]:
    """Environment for a stack worker (WorkerSpec.env) that runs the stand-in; it exits 1 after the log line
    containing fail_at, and writes its argv as JSON to record (default folder/argv.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    script, log = folder / "replay.py", folder / "vllm-startup.log"
    script.write_text(REPLAY)
    log.write_text("\n".join(EMBED_STARTUP[1:]) + "\n")  # the launcher prints its own first line
    python = folder / "python"
    python.write_text(f'#!/bin/sh\nshift 2\nexec {sys.executable} {script} "$@"\n')  # drops "-m module"
    python.chmod(0o755)
    env = {"SWITCHYARD_WORKER_VLLM_PYTHON": str(python), "SWITCHYARD_WORKER_ENGINE": "cpu"}
    env |= {"REPLAY_LOG": str(log), "REPLAY_PAUSE_AT": PAUSE_AT, "REPLAY_RECORD": str(record or folder / "argv.json")}
    return env | ({"REPLAY_FAIL_AT": fail_at} if fail_at else {})
