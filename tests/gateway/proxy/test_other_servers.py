"""Streams from OpenAI-compatible servers that are not vLLM, through the gateway with its defaults (mid-stream
failover on): events framed with CRLF pass one by one, and a stream whose head the gateway cannot read is
never sent again once part of it reached the client."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx

from tests.gateway.scripted_upstream import DIE, Script, scripted_app
from tests.servers import ThreadedServer, gateway, wait_until

CHAT = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]}


def chunk(delta: bytes, finish: bytes = b"null") -> bytes:
    return (
        b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
        b'"delta":%s,"logprobs":null,"finish_reason":%s}]}' % (delta, finish)
    )


def lines(response: httpx.Response) -> Iterator[str]:
    for line in response.iter_lines():
        if line.startswith("data: "):
            yield line[len("data: ") :]


def test_crlf_events_go_out_one_by_one_and_whole() -> None:
    """sse-starlette's framing (CRLF): the first event reaches the client while the server still holds the
    rest back, and the whole stream arrives as sent, with its [DONE] and no error."""
    crlf = b"\r\n\r\n"
    events = [
        chunk(b'{"role":"assistant","content":""}') + crlf,
        chunk(b'{"content":"One"}') + crlf,
        chunk(b'{"content":" two"}', b'"stop"') + crlf,
        b"data: [DONE]" + crlf,
    ]
    release = threading.Event()
    script = Script(events, gates={2: release})
    with ThreadedServer(scripted_app("m", script)) as upstream, gateway(upstream.url) as gw:
        wait_until(lambda: httpx.get(gw.url + "/v1/models").json()["data"], 5, what="the model")
        with httpx.stream("POST", gw.url + "/v1/chat/completions", json=CHAT, timeout=15) as response:
            assert response.status_code == 200
            received = lines(response)
            first, second = next(received), next(received)  # before the server sends the rest
            assert not release.is_set()
            assert '"role":"assistant"' in first
            assert '"content":"One"' in second
            release.set()
            rest = list(received)
        body = httpx.post(gw.url + "/v1/chat/completions", json=CHAT, timeout=15).content
    assert len(rest) == 2
    assert '"content":" two"' in rest[0]
    assert rest[1] == "[DONE]"
    assert body == b"".join(events)  # untouched, CRLFs and all


def test_a_stream_whose_head_cannot_be_read_is_not_sent_twice() -> None:
    """A server that writes its choices before its head (llama.cpp's does) and dies after two tokens: the
    stream cannot be continued (the gateway does not know its head), and since the client has those two
    tokens the request must not go to the other backend again; the client gets an error event and [DONE]."""

    def first_choices(delta: bytes, finish: bytes = b"null") -> bytes:
        return (
            b'data: {"choices":[{"index":0,"delta":%s,"finish_reason":%s,"token_ids":[7]}],"created":1,'
            b'"id":"chatcmpl-1","model":"m","object":"chat.completion.chunk"}\n\n' % (delta, finish)
        )

    pieces = [
        first_choices(b'{"role":"assistant","content":""}'),
        first_choices(b'{"content":"One"}'),
        first_choices(b'{"content":" two"}'),
        DIE,
    ]
    one, other = Script(pieces), Script(pieces)
    with (
        ThreadedServer(scripted_app("m", one)) as a,
        ThreadedServer(scripted_app("m", other)) as b,
        gateway(a.url, b.url) as gw,
    ):
        wait_until(lambda: len(gw.registry.candidates("m")) == 2, 5, what="both backends")
        with httpx.stream("POST", gw.url + "/v1/chat/completions", json=CHAT, timeout=15) as response:
            assert response.status_code == 200
            received = list(lines(response))
        metrics = httpx.get(gw.url + "/metrics").text
    assert len(one.requests) + len(other.requests) == 1  # never sent again
    contents = [line for line in received if '"content":"' in line and '"content":""' not in line]
    assert len(contents) == 2
    assert all('"token_ids":null' in line for line in received[:3])  # the client did not ask for ids
    assert '"error"' in received[-2]
    assert received[-1] == "[DONE]"
    assert 'switchyard_stream_failovers_total{model="m",outcome="unsupported"} 1.0' in metrics
