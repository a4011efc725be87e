"""The simulated vLLM server as a pure ASGI app: `create_sim_app(SimConfig) -> SimApp`.

Routes: GET /health, /metrics, /v1/models, /version, /kv_event_sources; POST /v1/chat/completions,
/v1/completions, /v1/embeddings, /tokenize, with runtime LoRA updating allowed /v1/load_lora_adapter and
/v1/unload_lora_adapter, in dev mode (VLLM_SERVER_DEV_MODE=1) /reset_prefix_cache. The app's lifespan starts
and stops the engine driver and the KV event publisher; an app that is served without lifespan events starts
them on its first request.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import Receive, Scope, Send

from worker.sim import responses
from worker.sim.asgi import ClientGone, header, read_body, send_bytes, send_error, send_json, send_text
from worker.sim.config import SimConfig
from worker.sim.generation import handle_generation
from worker.sim.protocol import ApiError, parse_chat, parse_embedding_inputs, parse_json_object
from worker.sim.state import SIM_VERSION, SimState
from worker.sim.text import embedding, embedding_base64, render_chat, token_pieces, tokenize

RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
DEV_MODE_ENV = "VLLM_SERVER_DEV_MODE"
AUTH_PREFIXES = ("/v1/", "/v2/", "/inference/")
JSON_ROUTES = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/tokenize",
        "/v1/load_lora_adapter",
        "/v1/unload_lora_adapter",
    }
)

Handler = Callable[[SimState, Scope, Receive, Send, bytes], Awaitable[None]]


def runtime_lora_allowed(config: SimConfig) -> bool:
    return config.allow_runtime_lora or os.environ.get(RUNTIME_LORA_ENV, "").lower() in ("1", "true")


def dev_mode(config: SimConfig) -> bool:
    return config.server_dev_mode or os.environ.get(DEV_MODE_ENV, "0") == "1"


class SimApp:
    """ASGI app of one simulated server; `state` is its engine, metrics and adapters."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.state = SimState(config)
        self._started = False
        self._routes: dict[tuple[str, str], Handler] = {
            ("GET", "/health"): _health,
            ("GET", "/metrics"): _metrics,
            ("GET", "/v1/models"): _models,
            ("GET", "/version"): _version,
            ("GET", "/kv_event_sources"): _kv_event_sources,
            ("POST", "/v1/chat/completions"): _chat,
            ("POST", "/v1/completions"): _completions,
            ("POST", "/v1/embeddings"): _embeddings,
            ("POST", "/tokenize"): _tokenize,
        }
        if runtime_lora_allowed(config):
            self._routes[("POST", "/v1/load_lora_adapter")] = _load_lora
            self._routes[("POST", "/v1/unload_lora_adapter")] = _unload_lora
        if dev_mode(config):
            self._routes[("POST", "/reset_prefix_cache")] = _reset_prefix_cache

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if not self._started:
            self._start()
        path, method = scope["path"], scope["method"]
        if (
            self.config.api_key is not None
            and path.startswith(AUTH_PREFIXES)
            and header(scope, b"authorization") != f"Bearer {self.config.api_key}"
        ):
            await send_json(send, 401, {"error": "Unauthorized"})
            return
        handler = self._routes.get((method, path))
        if handler is None:
            known = any(p == path for _, p in self._routes)
            status = 405 if known else 404
            await send_json(send, status, {"detail": "Method Not Allowed" if known else "Not Found"})
            return
        try:
            body = b""
            if method == "POST":
                body = await read_body(receive)
                if path in JSON_ROUTES:
                    media = (header(scope, b"content-type") or "").split(";")[0].strip().lower()
                    if media != "application/json":
                        raise ApiError(
                            400, "Unsupported Media Type: Only 'application/json' is allowed", "BadRequestError"
                        )
            await handler(self.state, scope, receive, send, body)
        except ClientGone:
            return
        except ApiError as err:
            await send_error(send, err)

    def _start(self) -> None:
        self._started = True
        self.state.started_at = time.monotonic()
        if self.state.publisher is not None:
            self.state.publisher.start()
        self.state.driver.start()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                if not self._started:
                    self._start()
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await self.state.driver.stop()
                if self.state.publisher is not None:
                    await self.state.publisher.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


def create_sim_app(config: SimConfig) -> SimApp:
    return SimApp(config)


def _not_ready() -> ApiError:
    return ApiError(503, "The simulated server is still starting (--slow-start).", "ServiceUnavailable")


async def _health(state: SimState, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
    await send_bytes(send, 200 if state.ready() else 503, b"", b"application/json")


async def _metrics(state: SimState, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
    await send_bytes(send, 200, state.metrics.render(), CONTENT_TYPE_LATEST.encode())


async def _version(state: SimState, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
    await send_json(send, 200, {"version": SIM_VERSION})


async def _kv_event_sources(state: SimState, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
    """vLLM's publisher config per data-parallel rank (one engine: rank "0"); {} without KV events."""
    pub = state.publisher
    await send_json(send, 200, {"0": pub.resolved.as_dict()} if pub is not None else {})


async def _reset_prefix_cache(state: SimState, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
    """vLLM's dev route: forget the prefix cache; `{"success": false}` while requests hold blocks, unless
    ?reset_running_requests=true. The AllBlocksCleared event goes out with the next engine step, as in vLLM."""
    query = parse_qs(bytes(scope.get("query_string", b"")).decode("latin-1"))
    force = query.get("reset_running_requests", ["false"])[-1].lower() in ("1", "true", "yes", "on")
    await send_json(send, 200, {"success": state.engine.reset_prefix_cache(force)})


async def _models(state: SimState, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
    if not state.ready():
        raise _not_ready()
    cfg = state.config
    cards = [responses.model_card(cfg.served_model_name, cfg.model_root, None, cfg.max_model_len)]
    cards += [responses.model_card(name, path, cfg.served_model_name, None) for name, path in state.loras.items()]
    await send_json(send, 200, {"object": "list", "data": cards})


async def _chat(state: SimState, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
    await handle_generation(state, receive, send, body, chat=True)


async def _completions(state: SimState, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
    await handle_generation(state, receive, send, body, chat=False)


async def _embeddings(state: SimState, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
    data = parse_json_object(body)
    model_field = data.get("model")
    model, _ = state.resolve_model(model_field if isinstance(model_field, str) else None)
    inputs = parse_embedding_inputs(data)
    fmt = data.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise ApiError(400, "encoding_format: Input should be 'float' or 'base64'", "Bad Request", "encoding_format")
    dim = state.config.embedding_dim
    items, prompt_tokens = [], 0
    for i, item in enumerate(inputs):
        text = item if isinstance(item, str) else " ".join(map(str, item))
        n = len(tokenize(item)) if isinstance(item, str) else len(item)
        if n > state.config.max_model_len:
            raise ApiError(400, f"input {i} has {n} tokens; the maximum context length is "
                           f"{state.config.max_model_len}", "BadRequestError")  # fmt: skip
        prompt_tokens += n
        vec = embedding(model, text, dim)
        items.append({"index": i, "object": "embedding", "embedding": vec if fmt == "float" else embedding_base64(vec)})
    await send_json(send, 200, {
        "id": f"embd-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": model,
        "data": items, "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens,
                                 "completion_tokens": 0, "prompt_tokens_details": None},
    })  # fmt: skip


async def _tokenize(state: SimState, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
    data = parse_json_object(body)
    model_field = data.get("model")
    state.resolve_model(model_field if isinstance(model_field, str) else None)
    if "messages" in data:
        chat = parse_chat(data)
        text = render_chat(chat.messages, chat.add_generation_prompt, chat.continue_final_message)
    elif isinstance(data.get("prompt"), str):
        text = data["prompt"]
    else:
        raise ApiError(400, "prompt: Field required (a string), or `messages`", "Bad Request", "prompt")
    tokens = tokenize(text)
    strs = token_pieces(text) if data.get("return_token_strs") else None
    await send_json(send, 200, {"count": len(tokens), "max_model_len": state.config.max_model_len,
                                "tokens": tokens, "token_strs": strs})  # fmt: skip


async def _load_lora(state: SimState, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
    data = parse_json_object(body)
    name, path = data.get("lora_name"), data.get("lora_path")
    if not isinstance(name, str) or not isinstance(path, str) or not name or not path:
        raise ApiError(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput")
    if name == state.config.served_model_name:
        raise ApiError(400, f"The lora adapter '{name}' clashes with the base model name.", "InvalidUserInput")
    if name in state.loras and not data.get("load_inplace"):
        raise ApiError(400, f"The lora adapter '{name}' has already been loaded. If you want to load the "
                       "adapter in place, set 'load_inplace' to True.", "InvalidUserInput")  # fmt: skip
    state.add_lora(name, path)
    state.engine.forget_lora(name)  # an in-place reload must be loaded into a slot again
    await send_text(send, 200, f"Success: LoRA adapter '{name}' added successfully.")


async def _unload_lora(state: SimState, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
    data = parse_json_object(body)
    name = data.get("lora_name")
    if not isinstance(name, str) or not name:
        raise ApiError(400, "'lora_name' needs to be provided to unload a LoRA adapter.", "InvalidUserInput")
    if name not in state.loras:
        raise ApiError(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
    state.remove_lora(name)
    state.engine.forget_lora(name)
    await send_text(send, 200, f"Success: LoRA adapter '{name}' removed successfully.")
