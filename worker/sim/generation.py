"""POST /v1/chat/completions and /v1/completions: validate, queue in the engine, answer or stream.

Fault flags act here, per request, when its next token is due after N were sent: `--stall-after-tokens`
stops sending (the connection stays open until the client leaves), `--drop-after-tokens` ends the ASGI call
with the response unfinished (the server closes the connection mid-body), `--error-after-tokens` sends vLLM's
mid-stream error event and `[DONE]` (non-streamed: vLLM's 500 error body), `--exit-after-tokens` ends the
whole process at once (os._exit, like kill -9). `--fail-rate` answers an error before any work.
A client that disconnects aborts its engine request at once (its batch slot and KV blocks free).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
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
from worker.sim.sampling import Completion, sample
from worker.sim.state import SimState
from worker.sim.text import render_chat, tokenize

SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
GENERATION_ERROR = ("Internal server error", "InternalServerError", 500)  # vLLM's GenerationError
EXIT_FLUSH_S = 0.02  # let the event loop write what was sent before the process goes


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
            await _exit_soon()


async def _exit_soon() -> None:
    await asyncio.sleep(EXIT_FLUSH_S)
    os._exit(1)


def _cache_usage(state: SimState, req: SimRequest) -> responses.CacheUsage | None:
    if not state.config.enable_prompt_tokens_details:
        return None
    bs = state.config.block_size
    created = max(0, (req.prompt_len // bs) * bs - req.num_cached_tokens)
    return responses.CacheUsage(req.num_cached_tokens, created)


async def _generate(state: SimState, receive: Receive, send: Send, body: bytes, chat: bool) -> None:
    data = parse_json_object(body)
    role = "assistant"
    if chat:
        request = parse_chat(data)
        params, role = request.params, request.response_role
        params.prompt_text = render_chat(
            request.messages, request.add_generation_prompt, request.continue_final_message
        )
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
    seed = params.seed if params.seed is not None else (0 if params.temperature == 0 else state.rng.getrandbits(32))
    completion = sample(model, token_ids, max_tokens, seed, stop=params.stop, ignore_eos=params.ignore_eos,
                        positional=state.config.positional_output)  # fmt: skip
    req = SimRequest(
        request_id=uuid.uuid4().hex,
        prompt_token_ids=token_ids,
        output_tokens=len(completion.token_ids),
        lora=lora,
        finish_reason=completion.finish_reason,
        output_token_ids=completion.token_ids,
        lora_id=state.lora_ids.get(lora) if lora is not None else None,
        report_cached_blocks=params.report_cached_blocks,
    )
    waiter = _Waiter(state, req, receive)
    state.driver.submit(req)
    try:
        if params.stream:
            writer = responses.ChunkWriter(
                chat, model, token_ids, fingerprint=state.fingerprint, continuous_usage=params.continuous_usage,
                include_usage=params.include_usage, return_token_ids=params.return_token_ids, role=role,
            )  # fmt: skip
            await _stream(state, send, req, waiter, writer, completion, params.include_usage)
        else:
            answer = responses.Answer(
                model, "".join(completion.pieces), completion.finish_reason, completion.stop_reason, token_ids,
                completion.token_ids, None, state.fingerprint, params.return_token_ids,
            )  # fmt: skip
            await _respond(state, send, req, waiter, answer, role if chat else None)
    finally:
        await waiter.close()


def _fault(state: SimState, sent: int) -> str | None:
    """The fault due before token `sent` (0-based) goes out, if any."""
    cfg = state.config
    for name, limit in (("exit", cfg.exit_after_tokens), ("error", cfg.error_after_tokens),
                        ("stall", cfg.stall_after_tokens), ("drop", cfg.drop_after_tokens)):  # fmt: skip
        if limit is not None and sent >= limit:
            return name
    return None


async def _stream(
    state: SimState,
    send: Send,
    req: SimRequest,
    waiter: _Waiter,
    writer: responses.ChunkWriter,
    completion: Completion,
    include_usage: bool,
) -> None:
    total = len(completion.token_ids)
    finish = (completion.finish_reason, completion.stop_reason)
    pieces, ids = completion.pieces, completion.token_ids
    faults = any(x is not None for x in (state.config.exit_after_tokens, state.config.error_after_tokens,
                                         state.config.stall_after_tokens, state.config.drop_after_tokens))  # fmt: skip
    await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
    sent = 0
    while True:
        await waiter.wait()
        if waiter.gone:
            return
        parts: list[bytes] = []
        cut = None  # the fault that ends this stream, once its limit is reached
        while sent < req.num_generated:
            if faults and (cut := _fault(state, sent)) is not None:
                if cut == "error" and sent == 0 and writer.chat:
                    parts.append(writer.role())  # vLLM opens the stream before it sees the failed output
                break
            if sent == 0 and writer.chat:
                parts.append(writer.role())
            piece = pieces[sent]
            sent += 1
            parts.append(writer.token(piece, ids[sent - 1], sent, finish if sent == total else None))
        if cut == "error":
            state.driver.abort(req, "error")
            parts += [responses.stream_error_event(*GENERATION_ERROR), responses.DONE]
            await send({"type": "http.response.body", "body": b"".join(parts), "more_body": False})
            return
        if parts:
            await send({"type": "http.response.body", "body": b"".join(parts), "more_body": True})
        if cut == "exit":
            await _exit_soon()
        if cut == "drop":
            return  # response left unfinished: the server closes the connection
        if cut == "stall":
            while not waiter.gone:
                await waiter.wait()
            return
        if sent == total:
            cache = _cache_usage(state, req)
            tail = (writer.usage_chunk(total, cache) if include_usage else b"") + responses.DONE
            await send({"type": "http.response.body", "body": tail, "more_body": False})
            return


async def _respond(
    state: SimState, send: Send, req: SimRequest, waiter: _Waiter, answer: responses.Answer, role: str | None
) -> None:
    cfg = state.config
    total = len(answer.token_ids)
    limit = min((x for x in (cfg.exit_after_tokens, cfg.error_after_tokens) if x is not None), default=None)
    while not req.done and not waiter.gone and (limit is None or limit >= total or req.num_generated <= limit):
        await waiter.wait()
    if waiter.gone:
        return
    if limit is not None and limit < total:
        if limit == cfg.exit_after_tokens:
            await _exit_soon()
        state.driver.abort(req, "error")
        message, err_type, status = GENERATION_ERROR
        await send_error(send, ApiError(status, message, err_type))
        return
    if cfg.stall_after_tokens is not None:
        while not waiter.gone:
            await waiter.wait()
        return
    answer = dataclasses.replace(answer, cache=_cache_usage(state, req))
    body = responses.chat_response(answer, role) if role is not None else responses.completion_response(answer)
    if cfg.drop_after_tokens is not None:
        raw = orjson.dumps(body)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": raw[: len(raw) // 2], "more_body": True})
        return
    await send_json(send, 200, body)
