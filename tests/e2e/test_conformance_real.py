"""The simulator conformance suite (tests/conformance) run against the real vLLM chat worker: what the
simulator promises about vLLM must hold for vLLM itself."""

from __future__ import annotations

import pytest

from tests.conformance.conftest import Target
from tests.conformance.test_vllm_conformance import *  # noqa: F403  (the same tests, collected here)
from tests.e2e.conftest import E2EStack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def target(e2e: E2EStack) -> Target:
    # The chat worker publishes KV events and reports cached prompt tokens (the launcher's defaults).
    return Target(e2e.chat_worker, "smollm2", "lora-a", None, kv_events=True, prompt_tokens_details=True)
