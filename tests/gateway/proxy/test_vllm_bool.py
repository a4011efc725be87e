"""Boolean request fields are read as vLLM's pydantic models read them."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from gateway.proxy.vllm_bool import is_true, vllm_bool


class _VllmLike(BaseModel):
    """A field declared as vLLM declares `stream`: an optional bool defaulting to False."""

    stream: bool | None = False


VALUES: list[Any] = [True, False, None, 1, 0, 2, -1, 1.0, 0.0, 0.5, "1", "0", "true", "True", "FALSE", "yes",
                     "no", "on", "off", "t", "f", "y", "n", " true", "", "maybe", [], {}, [True]]  # fmt: skip


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_reads_like_a_vllm_request_model(value: Any) -> None:
    try:
        expected: bool | None = _VllmLike(stream=value).stream
    except ValidationError:
        expected = None  # vLLM answers 400
    assert vllm_bool(value) is expected
    assert is_true(value) is (expected is True)
