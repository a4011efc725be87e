"""Issue 8: hostile input never makes the gateway answer a 5xx of its own, crash or hang.

One gateway and one healthy simulator serve the whole module over real sockets. Hypothesis sends malformed
and mistyped JSON, deep and oversized bodies, odd headers, broken multipart and random paths and methods.
A 5xx is allowed only when it came from the simulator: the same request sent straight to the simulator must
answer the same status. Every exchange has a client timeout (a hang fails), and the gateway must still
answer /health after each test. SWITCHYARD_FUZZ_SCALE multiplies the example counts (default 1).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import string
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote, quote_from_bytes

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gateway.routes import JSON_ROUTES, MULTIPART_ROUTES
from tests.servers import GatewayServer, SimProcess, gateway, running_sims, sim

MODEL = "fuzz"
MAX_BODY = 256 * 1024
TIMEOUT = 10.0
SCALE = float(os.environ.get("SWITCHYARD_FUZZ_SCALE", "1"))


def fuzz_settings(examples: int) -> Callable[[Any], Any]:
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )


@pytest.fixture(scope="module")
def upstream() -> Iterator[SimProcess]:
    # quick decode: fuzzed max_tokens may ask for the whole context
    with running_sims(sim(MODEL, "--decode-ms-per-token", "0.05")) as (server,):
        yield server


@pytest.fixture(scope="module")
def gw(upstream: SimProcess) -> Iterator[GatewayServer]:
    with gateway(upstream.url, max_body_bytes=MAX_BODY) as server:
        yield server


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=TIMEOUT) as client:
        yield client


@pytest.fixture(autouse=True)
def still_alive(gw: GatewayServer) -> Iterator[None]:
    yield
    assert httpx.get(gw.url + "/health", timeout=TIMEOUT).status_code == 200, "the gateway stopped answering"


def assert_no_gateway_5xx(status: int | None, text: str, replay: Callable[[], int | None], what: str) -> None:
    """A 5xx passes only if the simulator, asked the same, answers the same status."""
    event(f"status {status}")  # the spread of answers shows in --hypothesis-show-statistics
    if status is None or status < 500:
        return
    direct = replay()
    assert direct == status, f"gateway answered {status} ({text[:300]!r}) to {what}; the simulator answered {direct}"


def post(client: httpx.Client, base: str, route: str, content: bytes, headers: dict[str, str]) -> httpx.Response:
    return client.post(base + route, content=content, headers=headers)


def check_post(
    http: httpx.Client,
    gw: GatewayServer,
    upstream: SimProcess,
    route: str,
    content: bytes,
    content_type: str = "application/json",
) -> httpx.Response:
    headers = {"content-type": content_type}
    response = post(http, gw.url, route, content, headers)  # a hang raises httpx.ReadTimeout and fails
    assert_no_gateway_5xx(
        response.status_code,
        response.text,
        lambda: post(http, upstream.url, route, content, headers).status_code,
        f"POST {route} with {content[:200]!r}",
    )
    return response


# -- JSON bodies ------------------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=40)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
SIM_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/tokenize")  # the simulator serves these
# the simulator's routes most of the time, so many requests get through to it and back
json_routes = st.one_of(st.sampled_from(SIM_ROUTES), st.sampled_from(SIM_ROUTES), st.sampled_from(JSON_ROUTES))
VALID = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "prompt": "hi", "input": "hi"}


@st.composite
def malformed_json(draw: st.DrawFn) -> bytes:
    """Bytes that are not a JSON object: garbage, a valid body cut or corrupted, other JSON types."""
    valid = json.dumps({**VALID, "max_tokens": 4}).encode()
    kind = draw(st.sampled_from(["bytes", "text", "cut", "corrupt", "not_object", "dupe_keys", "bad_utf8"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "text":
        return draw(st.text(max_size=300)).encode()
    if kind == "cut":
        return valid[: draw(st.integers(0, len(valid) - 1))]
    if kind == "corrupt":
        at = draw(st.integers(0, len(valid) - 1))
        return valid[:at] + draw(st.binary(min_size=1, max_size=4)) + valid[at + 1 :]
    if kind == "not_object":
        return json.dumps(draw(json_scalars | st.lists(json_values, max_size=3)), allow_nan=True).encode()
    if kind == "dupe_keys":
        return b'{"model": "' + MODEL.encode() + b'", "model": ' + json.dumps(draw(json_values)).encode() + b"}"
    return b'{"model": "' + draw(st.binary(min_size=1, max_size=8)) + b'\xff\xfe", "prompt": "x"}'


@fuzz_settings(500)
@given(route=json_routes, body=malformed_json())
def test_malformed_json(http: httpx.Client, gw: GatewayServer, upstream: SimProcess, route: str, body: bytes) -> None:
    response = check_post(http, gw, upstream, route, body)
    if response.status_code == 200:  # only a body that is still a JSON object may get through
        assert body.lstrip().startswith(b"{"), body[:200]


@st.composite
def mistyped_request(draw: st.DrawFn) -> dict[str, Any]:
    """A JSON object whose well-known fields may hold anything, model usually the served one."""
    body: dict[str, Any] = dict(VALID)
    body["model"] = MODEL if draw(st.integers(0, 9)) < 7 else draw(json_values | st.text(min_size=1, max_size=300))
    for key in ("messages", "prompt", "input", "stream", "stream_options", "n", "temperature", "logprobs", "stop"):
        if draw(st.integers(0, 5)) == 0:
            body[key] = draw(json_values)
    if draw(st.integers(0, 3)) == 0:
        body["messages"] = [
            {"role": draw(st.sampled_from(["user", "system"]) | json_values), "content": draw(json_values)}
        ]
    if draw(st.booleans()):
        body["max_tokens"] = draw(st.integers(-5, 3000) | json_values)
    if draw(st.booleans()):
        body["stream"] = True
    if draw(st.booleans()):
        body.pop("model")
    return body


@fuzz_settings(700)
@given(route=json_routes, body=mistyped_request())
def test_wrong_types_for_known_fields(
    http: httpx.Client, gw: GatewayServer, upstream: SimProcess, route: str, body: dict[str, Any]
) -> None:
    check_post(http, gw, upstream, route, json.dumps(body, allow_nan=True).encode())


@st.composite
def deep_or_huge(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["deep_list", "deep_object", "deep_in_messages", "huge_string", "huge_list"]))
    depth = draw(st.integers(1, 20_000))
    if kind == "deep_list":
        return b'{"model": "fuzz", "prompt": ' + b"[" * depth + b"]" * depth + b"}"
    if kind == "deep_object":
        return b'{"model": "fuzz", "x": ' + b'{"a": ' * depth + b"1" + b"}" * depth + b"}"
    if kind == "deep_in_messages":
        inner = b"[" * depth + b"]" * depth
        return b'{"model": "fuzz", "messages": [{"role": "user", "content": ' + inner + b"}]}"
    size = draw(st.integers(MAX_BODY // 2, MAX_BODY * 2))
    if kind == "huge_string":
        return b'{"model": "fuzz", "prompt": "' + b"a" * size + b'", "max_tokens": 1}'
    count = size // 4
    return b'{"model": "fuzz", "input": [' + b",".join([b"1.5"] * count) + b"]}"


@fuzz_settings(150)
@given(route=json_routes, body=deep_or_huge(), chunked=st.booleans())
def test_deep_and_huge_bodies(
    http: httpx.Client, gw: GatewayServer, upstream: SimProcess, route: str, body: bytes, chunked: bool
) -> None:
    headers = {"content-type": "application/json"}
    if chunked:  # no Content-Length: the gateway must count as it reads

        def pieces() -> Iterator[bytes]:
            for start in range(0, len(body), 64 * 1024):
                yield body[start : start + 64 * 1024]

        response = http.post(gw.url + route, content=pieces(), headers=headers)
    else:
        response = http.post(gw.url + route, content=body, headers=headers)
    assert_no_gateway_5xx(
        response.status_code,
        response.text,
        lambda: post(http, upstream.url, route, body, headers).status_code,
        f"POST {route} with a {len(body)}-byte body",
    )
    if len(body) > MAX_BODY:
        assert response.status_code == 413


# -- raw HTTP: headers, paths, methods ----------------------------------------------------------------------


def raw_exchange(port: int, request: bytes) -> tuple[int | None, bytes]:
    """Send raw bytes, read until the server closes; (status or None when it closed without answering)."""
    data = b""
    # A server that answers early (431, 413) and closes with part of the request unread makes the kernel
    # send a reset; whatever arrived before it is the answer. A hang raises TimeoutError.
    with (
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock,
        contextlib.suppress(ConnectionResetError, BrokenPipeError),
    ):
        sock.sendall(request)
        while chunk := sock.recv(65536):
            data += chunk
    if not data:
        return None, b""
    parts = data.split(b" ", 2)
    assert parts[0].startswith(b"HTTP/1."), f"not an HTTP response: {data[:200]!r}"
    return int(parts[1]), data


def raw_request(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> bytes:
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: gateway", b"Connection: close"]
    lines += [name + b": " + value for name, value in headers]
    lines.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def check_raw(gw: GatewayServer, upstream: SimProcess, request: bytes) -> int | None:
    status, data = raw_exchange(gw.port, request)
    if status is None:  # closed without an answer: acceptable for garbage, never a crash
        assert httpx.get(gw.url + "/health", timeout=TIMEOUT).status_code == 200
    assert_no_gateway_5xx(
        status, data.decode("latin-1"), lambda: raw_exchange(upstream.port, request)[0], f"{request[:300]!r}"
    )
    return status


TOKEN_CHARS = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
RESERVED = {b"host", b"connection", b"content-length", b"transfer-encoding", b"expect", b"upgrade", b"te"}
header_names = st.text(TOKEN_CHARS, min_size=1, max_size=60).map(str.encode).filter(lambda n: n.lower() not in RESERVED)
header_values = st.one_of(
    st.text(string.printable.strip() + " ", max_size=200).map(str.encode),
    st.binary(max_size=200).map(lambda v: v.replace(b"\r", b"").replace(b"\n", b"").replace(b"\x00", b"")),
    st.text(max_size=200).map(lambda v: v.encode()).filter(lambda v: not ({13, 10, 0} & set(v))),
    st.integers(1, 120_000).map(lambda n: b"x" * n),
)
well_known = st.sampled_from(
    [b"content-type", b"authorization", b"x-request-id", b"x-session-id", b"x-switchyard-priority", b"accept"]
)


@fuzz_settings(400)
@given(
    route=json_routes,
    headers=st.lists(st.tuples(header_names | well_known, header_values), max_size=20),
    many=st.integers(0, 400),
)
def test_odd_headers(
    gw: GatewayServer, upstream: SimProcess, route: str, headers: list[tuple[bytes, bytes]], many: int
) -> None:
    headers = [*headers, *((f"x-many-{i}".encode(), b"v") for i in range(many))]
    if not any(name == b"content-type" for name, _ in headers):
        headers.append((b"content-type", b"application/json"))
    body = json.dumps({**VALID, "max_tokens": 2}).encode()
    check_raw(gw, upstream, raw_request(b"POST", route.encode(), headers, body))


@st.composite
def broken_multipart(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """(content type, body) of a multipart/form-data request that is broken in some way, or not."""
    boundary = draw(st.binary(min_size=0, max_size=70).filter(lambda b: not ({13, 10, 0, 59} & set(b))))
    content_type = draw(
        st.sampled_from(
            [
                b"multipart/form-data; boundary=" + boundary,
                b'multipart/form-data; boundary="' + boundary + b'"',
                b"multipart/form-data",
                b"multipart/form-data; boundary=",
                b"application/json",
                b"text/plain; boundary=" + boundary,
            ]
        )
    )
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from([b"model", b"file", b"language", b""]) | st.binary(max_size=10))
        head = b'Content-Disposition: form-data; name="' + name + b'"'
        if draw(st.booleans()):
            head += b'; filename="a.wav"\r\nContent-Type: audio/wav'
        value = draw(st.sampled_from([MODEL.encode(), b"\xff\xfe", b""]) | st.binary(max_size=300))
        separator = draw(st.sampled_from([b"\r\n\r\n", b"\r\n\r\n", b"\r\n", b""]))
        parts.append(b"--" + boundary + b"\r\n" + head + separator + value + b"\r\n")
    closing = draw(st.sampled_from([b"--" + boundary + b"--\r\n", b"", b"--" + boundary]))
    garbage = draw(st.binary(max_size=50))
    return content_type, draw(st.sampled_from([b"", garbage])) + b"".join(parts) + closing


@fuzz_settings(400)
@given(route=st.sampled_from(MULTIPART_ROUTES), multipart=broken_multipart())
def test_broken_multipart_on_audio_routes(
    gw: GatewayServer, upstream: SimProcess, route: str, multipart: tuple[bytes, bytes]
) -> None:
    content_type, body = multipart
    check_raw(gw, upstream, raw_request(b"POST", route.encode(), [(b"content-type", content_type)], body))


KNOWN_PATHS = [
    b"/health",
    b"/ready",
    b"/metrics",
    b"/v1/models",
    b"/v1/models/fuzz",
    *(r.encode() for r in JSON_ROUTES),
]
path_chars = st.characters(codec="utf-8", exclude_characters="\r\n\x00 ")
paths = st.one_of(
    st.sampled_from(KNOWN_PATHS),
    st.sampled_from(KNOWN_PATHS).flatmap(
        lambda p: st.text(path_chars, max_size=30).map(lambda s: p + quote(s).encode())
    ),
    st.text(path_chars, max_size=80).map(lambda s: b"/" + quote(s, safe="/%?=&").encode()),
    st.text(path_chars, max_size=20).map(lambda s: b"/" + s.encode()),
    st.binary(max_size=60).map(lambda b: b"/" + b.replace(b" ", b"%20").replace(b"\r", b"").replace(b"\n", b"")),
    st.sampled_from([b"*", b"http://elsewhere/v1/models", b"//", b"/..%2f..%2f", b"/v1/models/%00", b"/%ff"]),
)
methods = st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"HEAD", b"TRACE"]) | st.text(
    TOKEN_CHARS, min_size=1, max_size=12
).map(str.encode)


@fuzz_settings(500)
@given(method=methods, path=paths, query=st.binary(max_size=40), body=st.binary(max_size=100))
def test_random_paths_and_methods(
    gw: GatewayServer, upstream: SimProcess, method: bytes, path: bytes, query: bytes, body: bytes
) -> None:
    query = quote_from_bytes(query, safe="=&").encode() if query[:1] != b"!" else query.translate(None, b" \r\n#")
    target = path + (b"?" + query if query else b"")
    headers = [(b"content-type", b"application/json")]
    if method == b"HEAD":  # a HEAD answer has no body: the Connection: close read still ends
        body = b""
    check_raw(gw, upstream, raw_request(method, target, headers, body))
