"""The startup phases `switchyard up` shows, read from the logs of the real vLLM workers of this session."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import E2EStack
from tests.worker.vllm_startup_log import EMBED_PHASES
from worker.phases import LogPhases

pytestmark = pytest.mark.e2e


def test_each_real_worker_log_shows_loading_then_the_api_server(e2e: E2EStack) -> None:
    for child in e2e.stack.workers:
        phases = LogPhases(child.log)
        phases.poll()
        seen = phases.seen
        assert seen[0] == "initializing the engine", (child.name, seen)
        assert "loading weights" in seen, (child.name, seen)
        assert seen[-1] == "starting the API server", (child.name, seen)


def test_the_embedding_worker_compiles_while_warming_up(e2e: E2EStack) -> None:
    embed = next(c for c in e2e.stack.workers if c.name == "embed")
    phases = LogPhases(embed.log)
    phases.poll()
    assert phases.seen == EMBED_PHASES  # the same steps as the log the unit tests replay
