"""gateway/http/protocol.py is run by uvicorn and reads its server state: these checks fail loudly, naming what
changed, when a uvicorn upgrade moves something it relies on. (The protocol's behaviour is tested over real
sockets in test_protocol.py.)"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import uvicorn
from uvicorn.config import Config
from uvicorn.server import Server, ServerState

ROOT = Path(__file__).resolve().parents[3]


def test_uvicorn_is_the_pinned_release() -> None:
    pinned = re.search(r'"uvicorn\[standard\]==([\w.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pinned is not None, "pyproject.toml must pin uvicorn exactly (gateway/http/protocol.py)"
    assert uvicorn.__version__ == pinned.group(1), (
        f"uvicorn {uvicorn.__version__} is installed, {pinned.group(1)} is pinned: re-check gateway/http/protocol.py"
    )


def test_server_state_has_what_the_protocol_reads() -> None:
    state = ServerState()
    assert isinstance(state.connections, set), "the protocol registers itself in ServerState.connections"
    assert isinstance(state.tasks, set), "the protocol registers each request's task in ServerState.tasks"
    assert isinstance(state.default_headers, list), "the protocol sends ServerState.default_headers (date, server)"
    assert state.total_requests == 0, "the protocol counts answered requests in ServerState.total_requests"


def test_the_server_builds_protocols_with_the_arguments_the_protocol_takes() -> None:
    source = inspect.getsource(Server.startup)
    for argument in ("config=config", "server_state=self.server_state", "app_state=self.lifespan.state"):
        assert argument in source, f"uvicorn's Server.startup no longer passes {argument} to the protocol"
    assert "shutdown()" in inspect.getsource(Server.shutdown), "uvicorn no longer calls connection.shutdown()"


def test_config_exposes_what_the_protocol_reads() -> None:
    config = Config(app=lambda scope, receive, send: None, proxy_headers=False)
    config.load()
    for name in ("loaded_app", "root_path", "timeout_keep_alive", "http_protocol_class"):
        assert hasattr(config, name), f"uvicorn's Config no longer has {name}"
