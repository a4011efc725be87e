"""POST /v1/chat/completions and /v1/completions: validate, queue in the engine, answer or stream.

Fault flags act here: `--fail-rate` answers an error before any work, `--stall-after-tokens`
stops sending (the connection stays open until the client leaves), `--drop-after-tokens` ends the
ASGI call with the response unfinished, so the server closes the connection mid-body.
A client that disconnects aborts its engine request at once (its batch slot and KV blocks free).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid

import orjson
from starlette.types import Receive, Send

from worker.sim import responses
from worker.sim.asgi import send_error, send_json
from worker.sim.engine import SimRequest
from worker.sim.protocol import (
    ApiError,
    GenerationParams,
    bad_request,
    parse_chat,
    parse_completion,
    parse_json_object,
)
from worker.sim.state import SimState
from worker.sim.text import Completion, render_chat, sample_completion, tokenize

SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


class _Waiter:
    """Wakes the response coroutine when the engine produced tokens or the client went away."""

    def __init__(self, state: SimState, req: SimRequest, receive: Receive) -> None:
        self.event = asyncio.Event()
        self.gone = False
        self._state, self._req, self._receive = state, req, receive
        req.on_output = self.event.set
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        self._state.driver.abort(self._req)
        self.event.set()

    async def wait(self) -> None:
        await self.event.wait()
        self.event.clear()

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._state.driver.abort(self._req)


def _check_length(state: SimState, params: GenerationParams, prompt_len: int) -> int:
    limit = state.config.max_model_len
    if prompt_len >= limit:
        raise bad_request(
            f"This model's maximum context length is {limit} tokens. However, your request has {prompt_len} "
            "input tokens. Please reduce the length of the input messages."
        )
    max_tokens = params.max_tokens if params.max_tokens is not None else limit - prompt_len
    if prompt_len + max_tokens > limit:
        raise bad_request(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the messages, {max_tokens} in the completion). "
            "Please reduce the length of the messages or completion."
        )
    return max_tokens


async def handle_generation(state: SimState, receive: Receive, send: Send, body: bytes, chat: bool) -> None:
    last = state.accept_generation()
    try:
        await _generate(state, receive, send, body, chat)
    except ApiError as err:
        await send_error(send, err)  # here, so that it goes out before an --exit-after-requests exit
    finally:
        if last:  # --exit-after-requests: crash once this answer is on the wire
            await asyncio.sleep(0.02)
            os._exit(1)


async def _generate(state: SimState, receive: Receive, send: Send, body: bytes, chat: bool) -> None:
    data = parse_json_object(body)
    if chat:
        params, messages = parse_chat(data)
        params.prompt_text = render_chat(messages)
    else:
        params = parse_completion(data)
    model, lora = state.resolve_model(params.model)
    token_ids = params.prompt_token_ids or tokenize(params.prompt_text or "")
    if not token_ids:
        raise bad_request("The prompt cannot be empty.", "prompt")
    max_tokens = _check_length(state, params, len(token_ids))
    if state.should_fail():
        status = state.config.fail_status
        await send_error(send, ApiError(status, f"Simulated failure (--fail-rate), status {status}"))
        return
    seed = params.seed if params.seed is not None else (0 if params.temperature == 0 else None)
    completion = sample_completion(model, token_ids, max_tokens, seed, params.stop, params.ignore_eos, state.rng)
    req = SimRequest(
        request_id=uuid.uuid4().hex,
        prompt_token_ids=token_ids,
        output_tokens=len(completion.pieces),
        lora=lora,
        finish_reason=completion.finish_reason,
    )
    waiter = _Waiter(state, req, receive)
    state.driver.submit(req)
    try:
        if params.stream:
            writer = responses.ChunkWriter(chat, model, len(token_ids), params.continuous_usage)
            await _stream(state, send, req, waiter, writer, completion, params.include_usage)
        else:
            await _respond(state, send, req, waiter, completion, model, chat)
    finally:
        await waiter.close()


async def _stream(
    state: SimState,
    send: Send,
    req: SimRequest,
    waiter: _Waiter,
    writer: responses.ChunkWriter,
    completion: Completion,
    include_usage: bool,
) -> None:
    cfg = state.config
    total = len(completion.pieces)
    finish = (completion.finish_reason, completion.stop_reason)
    await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
    sent = 0
    while True:
        await waiter.wait()
        if waiter.gone:
            return
        parts: list[bytes] = []
        cut = None  # "stall" | "drop" once a fault limit is reached
        while sent < req.num_generated:
            if cfg.stall_after_tokens is not None and sent >= cfg.stall_after_tokens:
                cut = "stall"
                break
            if cfg.drop_after_tokens is not None and sent >= cfg.drop_after_tokens:
                cut = "drop"
                break
            if sent == 0 and writer.chat:
                parts.append(writer.role())
            piece = completion.pieces[sent]
            sent += 1
            parts.append(writer.token(piece, sent, finish if sent == total else None))
        if parts:
            await send({"type": "http.response.body", "body": b"".join(parts), "more_body": True})
        if cut == "drop":
            return  # response left unfinished: the server closes the connection
        if cut == "stall":
            while not waiter.gone:
                await waiter.wait()
            return
        if sent == total:
            tail = (writer.usage_chunk(total) if include_usage else b"") + responses.DONE
            await send({"type": "http.response.body", "body": tail, "more_body": False})
            return


async def _respond(
    state: SimState, send: Send, req: SimRequest, waiter: _Waiter, completion: Completion, model: str, chat: bool
) -> None:
    cfg = state.config
    while not req.done and not waiter.gone:
        await waiter.wait()
    if waiter.gone:
        return
    if cfg.stall_after_tokens is not None:
        while not waiter.gone:
            await waiter.wait()
        return
    text = "".join(completion.pieces)
    build = responses.chat_response if chat else responses.completion_response
    body = build(model, text, completion.finish_reason, completion.stop_reason, req.prompt_len, len(completion.pieces))
    if cfg.drop_after_tokens is not None:
        raw = orjson.dumps(body)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": raw[: len(raw) // 2], "more_body": True})
        return
    await send_json(send, 200, body)
