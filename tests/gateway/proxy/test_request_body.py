from __future__ import annotations

import pytest

from gateway.errors import InvalidRequest
from gateway.proxy.request_body import BodyKind, routing_fields

BOUNDARY = b"----switchyard7MA4YWxkTrZu0gW"
CONTENT_TYPE = b"multipart/form-data; boundary=" + BOUNDARY


def multipart(*fields: tuple[str, bytes], filename: str | None = None) -> bytes:
    out = b""
    for name, value in fields:
        disposition = f'form-data; name="{name}"'
        if name == "file" and filename:
            disposition += f'; filename="{filename}"'
        out += b"--" + BOUNDARY + b"\r\nContent-Disposition: " + disposition.encode() + b"\r\n\r\n" + value + b"\r\n"
    return out + b"--" + BOUNDARY + b"--\r\n"


def test_json_model_and_stream() -> None:
    fields = routing_fields(BodyKind.JSON, b'{"stream": true, "model": "m"}', b"application/json")
    assert (fields.model, fields.stream) == ("m", True)


def test_json_without_model() -> None:
    assert routing_fields(BodyKind.JSON, b"{}", None).model is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"model": 7}', "`model` must be a string"),
        (b"", "not valid JSON"),
    ],
)
def test_json_errors(body: bytes, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        routing_fields(BodyKind.JSON, body, b"application/json")


def test_multipart_model_found_after_binary_file() -> None:
    body = multipart(
        ("file", b"\x00\xffRIFF--" + BOUNDARY[:5] + b"\r\n\r\n"), ("model", b"whisper-small"), filename="a.wav"
    )
    assert routing_fields(BodyKind.MULTIPART, body, CONTENT_TYPE).model == "whisper-small"


def test_multipart_without_model() -> None:
    assert routing_fields(BodyKind.MULTIPART, multipart(("language", b"en")), CONTENT_TYPE).model is None


@pytest.mark.parametrize(
    ("content_type", "message"),
    [
        (b"application/json", "multipart/form-data"),
        (None, "multipart/form-data"),
        (b"multipart/form-data", "no boundary"),
    ],
)
def test_multipart_content_type_errors(content_type: bytes | None, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        routing_fields(BodyKind.MULTIPART, multipart(("model", b"m")), content_type)


def test_multipart_part_without_header_end() -> None:
    with pytest.raises(InvalidRequest, match="Malformed multipart"):
        routing_fields(BodyKind.MULTIPART, b"--" + BOUNDARY + b"\r\nContent-Disposition: x", CONTENT_TYPE)


def test_a_file_holding_the_boundary_cannot_pose_as_the_model_field() -> None:
    """A delimiter is CRLF "--" boundary: the boundary inside a part's bytes, not at a line start, is content
    (the backend reads it so), so a file cannot make the gateway route and authorise by another model."""
    forged = b"abc--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="model"\r\n\r\nnope'
    body = multipart(("file", forged), ("model", b"whisper-small"), filename="a.wav")
    assert routing_fields(BodyKind.MULTIPART, body, CONTENT_TYPE).model == "whisper-small"


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "m", "temperature": NaN}',
        b'{"model": "m", "top_p": Infinity}',
        b'\xef\xbb\xbf{"model": "m"}',  # a UTF-8 byte order mark
    ],
)
def test_json_that_vllms_parser_reads_is_read(body: bytes) -> None:
    """vLLM parses request bodies with Python's json: what it reads, the gateway must not refuse."""
    assert routing_fields(BodyKind.JSON, body, b"application/json").model == "m"


def test_a_lone_surrogate_is_refused() -> None:
    """Python's json reads it, but it is no text: routing and a failover could not serialise it again."""
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        routing_fields(BodyKind.JSON, b'{"model": "m", "prompt": "\\ud83d"}', b"application/json")
