"""Token ids from a backend's own POST /tokenize (a real simulator over a real socket), cached, never fatal."""

from __future__ import annotations

import asyncio

import httpx
import orjson

from gateway.proxy.upstream import UpstreamPool
from gateway.routing.tokenizer import Tokenizer, tokenize_body
from tests.servers import running_sims, sim

MESSAGES = [{"role": "system", "content": "Be brief. " * 50}, {"role": "user", "content": "What is a KV cache?"}]


def test_the_body_carries_what_changes_the_rendering_and_nothing_else() -> None:
    payload = {"model": "m", "messages": MESSAGES, "tools": [{"type": "function"}], "max_tokens": 5, "stream": True}
    assert orjson.loads(tokenize_body("m", payload) or b"") == {
        "model": "m",
        "messages": MESSAGES,
        "tools": [{"type": "function"}],
    }
    assert orjson.loads(tokenize_body("m", {"prompt": "abc", "add_special_tokens": False}) or b"") == {
        "model": "m", "prompt": "abc", "add_special_tokens": False,
    }  # fmt: skip
    assert tokenize_body("m", {"prompt": [1, 2, 3]}) is None  # token ids need no tokenizing
    assert tokenize_body("m", {"input": "x"}) is None


def test_tokens_are_the_engines_and_a_repeat_is_not_asked_again() -> None:
    with running_sims(sim("m")) as (upstream,):
        expected = httpx.post(upstream.url + "/tokenize", json={"model": "m", "messages": MESSAGES}).json()["tokens"]

        async def run() -> None:
            pool = UpstreamPool(4.0, 2.0)
            try:
                tokenizer = Tokenizer(pool.fetch, timeout=2.0)
                body = tokenize_body("m", {"messages": MESSAGES})
                assert body is not None
                assert await tokenizer.tokens(upstream.url, None, body) == expected
                assert await tokenizer.tokens(upstream.url, None, body) == expected
                assert tokenizer.calls == 1
                unknown = tokenize_body("no-such-model", {"messages": MESSAGES})
                assert unknown is not None
                assert await tokenizer.tokens(upstream.url, None, unknown) is None  # a 404: no tokens, no error
                assert await tokenizer.tokens("http://127.0.0.1:9", None, body + b" ") is None  # refused
                assert tokenizer.failures == 2
            finally:
                pool.close()

        asyncio.run(run())


def test_a_slow_backend_gives_no_tokens_within_the_timeout() -> None:
    async def stalled_fetch(*args: object) -> tuple[int, bytes]:
        await asyncio.sleep(5)
        return 200, b"{}"

    async def run() -> None:
        tokenizer = Tokenizer(stalled_fetch, timeout=0.2)  # type: ignore[arg-type]
        started = asyncio.get_running_loop().time()
        assert await tokenizer.tokens("http://127.0.0.1:1", None, b"{}") is None
        assert asyncio.get_running_loop().time() - started < 1.0
        assert tokenizer.failures == 1

    asyncio.run(run())
