"""Request parsing and vLLM-shaped errors for the simulator's OpenAI-compatible routes.

Parsing is hand-written (no pydantic models on the hot path) and strict about what the simulator
relies on; unknown fields are ignored as vLLM does for most sampling knobs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import orjson

from worker.sim.text import VOCAB_SIZE

JSON = dict[str, Any]

_ERROR_TYPES: Mapping[int, str] = MappingProxyType(
    {
        400: "BadRequestError",
        401: "Unauthorized",
        404: "NotFoundError",
        408: "RequestTimeout",
        429: "TooManyRequests",
        500: "InternalServerError",
        502: "BadGateway",
        503: "ServiceUnavailable",
        504: "GatewayTimeout",
    }
)


class ApiError(Exception):
    """An error answered as `{"error": {message, type, param, code}}` with `status`."""

    def __init__(self, status: int, message: str, err_type: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type or _ERROR_TYPES.get(status, "InternalServerError")
        self.param = param

    def body(self) -> JSON:
        return {"error": {"message": self.message, "type": self.err_type, "param": self.param, "code": self.status}}


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, "BadRequestError", param)


def model_not_found(name: str, served: str) -> ApiError:
    # vLLM 0.32 names the server's own model after the sentence (seen against the real server).
    return ApiError(404, f"The model `{name}` does not exist. Valid aliases: {served}.", "NotFoundError", "model")


def parse_json_object(raw: bytes) -> JSON:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"JSON decode error: {exc}", "Bad Request") from None
    if not isinstance(body, dict):
        raise ApiError(400, "Input should be a valid dictionary or object", "Bad Request")
    return body


@dataclass
class GenerationParams:
    """What the chat and completions routes share once the body is parsed."""

    model: str | None
    prompt_text: str | None  # None when the prompt came as token ids
    prompt_token_ids: list[int] | None
    max_tokens: int | None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    temperature: float = 1.0
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False
    ignore_eos: bool = False
    return_token_ids: bool = False  # vLLM's extension: prompt and output token ids in the answer
    report_cached_blocks: bool = False  # vllm_xargs {"kv_cache_report_mode": "full"}


@dataclass
class ChatRequest:
    """A parsed chat body: the shared parameters, the messages and how the template renders them."""

    params: GenerationParams
    messages: list[tuple[str, str]]
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    @property
    def response_role(self) -> str:
        """vLLM answers as "assistant" with the generation prompt, else in the last message's role."""
        return "assistant" if self.add_generation_prompt else self.messages[-1][0]


_TRUE = frozenset({"1", "true", "t", "yes", "y", "on"})
_FALSE = frozenset({"0", "false", "f", "no", "n", "off"})


def _opt_bool(body: JSON, key: str) -> bool | None:
    """A boolean field as pydantic reads it (lax: also 0/1 and strings such as "true"/"yes")."""
    value = body.get(key)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    raise ApiError(400, f"{key}: Input should be a valid boolean", "Bad Request", key)


def _opt_int(body: JSON, key: str, minimum: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{key}: Input should be a valid integer", "Bad Request", key)
    if value < minimum:
        raise bad_request(f"{key} must be at least {minimum}, got {value}.", key)
    return value


def _common(body: JSON) -> GenerationParams:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "model: Input should be a valid string", "Bad Request", "model")
    stop_raw = body.get("stop")
    if stop_raw is None:
        stop: list[str] = []
    elif isinstance(stop_raw, str):
        stop = [stop_raw]
    elif isinstance(stop_raw, list) and all(isinstance(s, str) for s in stop_raw):
        stop = [s for s in stop_raw if s]
    else:
        raise ApiError(400, "stop: Input should be a valid string or list of strings", "Bad Request", "stop")
    temperature = body.get("temperature")
    if temperature is None:
        temperature = 1.0
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or temperature < 0:
        raise bad_request("temperature must be a non-negative number.", "temperature")
    n = body.get("n")
    if n is not None and n != 1:
        raise bad_request("The simulator supports n=1 only.", "n")
    stream = _opt_bool(body, "stream")
    options = body.get("stream_options")
    include_usage = continuous = False
    if options is not None:
        if not stream:
            raise bad_request("Stream options can only be defined when `stream=True`.", "stream_options")
        if not isinstance(options, dict):
            raise ApiError(400, "stream_options: Input should be a valid dictionary", "Bad Request")
        include_usage = bool(_opt_bool(options, "include_usage"))
        # as in vLLM: usage in every chunk only for a stream that asked for usage at all
        continuous = include_usage and bool(_opt_bool(options, "continuous_usage_stats"))
    max_tokens = _opt_int(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _opt_int(body, "max_tokens", 1)
    xargs = body.get("vllm_xargs")
    if xargs is not None and not isinstance(xargs, dict):
        raise ApiError(400, "vllm_xargs: Input should be a valid dictionary", "Bad Request", "vllm_xargs")
    return GenerationParams(
        model=model,
        prompt_text=None,
        prompt_token_ids=None,
        max_tokens=max_tokens,
        stop=stop,
        seed=_opt_int(body, "seed", -(2**63)),
        temperature=float(temperature),
        stream=bool(stream),
        include_usage=include_usage,
        continuous_usage=continuous,
        ignore_eos=bool(body.get("ignore_eos", False)),
        return_token_ids=bool(_opt_bool(body, "return_token_ids")),
        report_cached_blocks=bool(xargs and xargs.get("kv_cache_report_mode") == "full"),
    )


def _message_text(content: object, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"messages[{index}].content: only text parts are supported", "messages")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ApiError(400, f"messages[{index}].content: Input should be a string or a list", "Bad Request")


# vLLM's own check (both set to true) and, when add_generation_prompt is left at its default, the error
# Hugging Face's apply_chat_template raises (both seen from vLLM 0.32)
BOTH_PROMPT_FLAGS = "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
CONTINUE_WITH_DEFAULT_PROMPT = (
    "continue_final_message and add_generation_prompt are not compatible. Use continue_final_message when you "
    "want the model to continue the final message, and add_generation_prompt when you want to add a header that "
    "will prompt it to start a new assistant message instead."
)


def parse_chat(body: JSON) -> ChatRequest:
    params = _common(body)
    add_generation_prompt = _opt_bool(body, "add_generation_prompt")
    continue_final_message = bool(_opt_bool(body, "continue_final_message"))
    if continue_final_message and add_generation_prompt:
        raise bad_request(BOTH_PROMPT_FLAGS)
    if continue_final_message and add_generation_prompt is None:
        raise bad_request(CONTINUE_WITH_DEFAULT_PROMPT)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: Field required (a non-empty list)", "Bad Request", "messages")
    rendered: list[tuple[str, str]] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise ApiError(400, f"messages[{i}]: each message needs a string `role`", "Bad Request")
        rendered.append((msg["role"], _message_text(msg.get("content"), i)))
    return ChatRequest(params, rendered, add_generation_prompt is not False, continue_final_message)


def parse_completion(body: JSON) -> GenerationParams:
    params = _common(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        params.prompt_text = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        params.prompt_token_ids = [int(t) for t in prompt]
        check_token_ids(params.prompt_token_ids)
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise bad_request("The simulator accepts one prompt per request.", "prompt")
    else:
        raise ApiError(400, "prompt: Field required (a string or a list of token ids)", "Bad Request", "prompt")
    return params


def check_token_ids(token_ids: list[int]) -> None:
    """vLLM's vocabulary check on prompt token ids (400, same message)."""
    for bad in (min(token_ids), max(token_ids)):
        if not 0 <= bad < VOCAB_SIZE:
            raise bad_request(f"Token id {bad} is out of vocabulary")


def parse_embedding_inputs(body: JSON) -> list[str | list[int]]:
    raw = body.get("input")
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in raw):
            return [[int(t) for t in raw]]
        if all(isinstance(s, str) for s in raw):
            return list(raw)
        if all(isinstance(s, list) and all(isinstance(t, int) for t in s) for s in raw):
            return [list(s) for s in raw]
    raise ApiError(400, "input: Input should be a string, a list of strings or token ids", "Bad Request", "input")
