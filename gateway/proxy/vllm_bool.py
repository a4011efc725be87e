"""A request's boolean fields as vLLM reads them.

vLLM validates requests with pydantic in lax mode, so `"stream": 1`, `"stream": "yes"` or `"include_usage":
"false"` mean what they say there. The gateway decides from the same fields whether to count a stream's tokens
and whether it may fail over: reading them more strictly than the engine would let a stream pass uncounted
(and uncharged against a key's token limit). So they are read with pydantic's own lax rules.
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter, ValidationError

_LAX_BOOL = TypeAdapter(bool)


def vllm_bool(value: Any) -> bool | None:
    """True or False as vLLM reads `value`; None when it is no boolean there (vLLM answers 400, or, for an
    optional field sent as null or left out, takes the field's default)."""
    if value is True or value is False or value is None:
        return value
    try:
        return _LAX_BOOL.validate_python(value)
    except ValidationError:
        return None


def is_true(value: Any) -> bool:
    """The field reads as true in vLLM."""
    return vllm_bool(value) is True
