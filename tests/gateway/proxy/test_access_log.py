"""The access log's lines: the JSON the entry describes, and the batched writer's lines as logging's basicConfig
would print them, over a real pipe."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from pathlib import Path

import uvloop

from gateway.proxy.access_log import FLUSH_ENTRIES, Entry, StreamAccessLog, record_bodies

KEYS = [
    "request_id",
    "route",
    "model",
    "backend",
    "status",
    "duration_ms",
    "ttft_ms",
    "prompt_tokens",
    "completion_tokens",
    "retries",
    "failovers",
    "cached_tokens_predicted",
    "cached_tokens_reported",
]


def entry(rid: bytes = b"abc123", **changes: object) -> Entry:
    values: list[object] = [
        1_700_000_000.25, rid, "/v1/chat/completions", "llama", "http://10.0.0.5:8000", 200, 0.0123456, 0.0045, 12, 9,
        1, 0, 128, 120,
    ]  # fmt: skip
    for index, value in changes.items():
        values[int(index[1:])] = value
    return tuple(values)  # type: ignore[return-value]


def line(one: Entry) -> str:
    """The JSON of an entry's line, as a batch of one writes it."""
    return '{"request_id":' + record_bodies([one])[0].decode() + "}"


def test_a_line_is_the_json_of_the_entry_in_the_logs_key_order() -> None:
    parsed = json.loads(line(entry()))
    assert list(parsed) == KEYS
    assert parsed == {
        "request_id": "abc123",
        "route": "/v1/chat/completions",
        "model": "llama",
        "backend": "http://10.0.0.5:8000",
        "status": 200,
        "duration_ms": 12.346,
        "ttft_ms": 4.5,
        "prompt_tokens": 12,
        "completion_tokens": 9,
        "retries": 1,
        "failovers": 0,
        "cached_tokens_predicted": 128,
        "cached_tokens_reported": 120,
    }


def test_unknowns_are_null_and_odd_strings_are_escaped() -> None:
    odd = line(
        entry(rid=b'id"with\\quote', _3='model "quoted"\n', _4=None, _7=None, _8=None, _9=None, _12=None, _13=None)
    )
    parsed = json.loads(odd)
    assert parsed["request_id"] == 'id"with\\quote'
    assert parsed["model"] == 'model "quoted"\n'
    for key in ("backend", "ttft_ms", "prompt_tokens", "completion_tokens", "cached_tokens_predicted"):
        assert parsed[key] is None


def test_a_batch_is_cut_into_its_records_whatever_their_strings_hold() -> None:
    """The batch is one JSON array cut between records: a request id or a name that spells the cut (or breaks
    the line) stays inside its own record."""
    tricky = [
        entry(rid=b'x"},{"request_id":"y'),
        entry(_3='},{"request_id":', _4='"}]'),
        entry(rid=b"plain", _2="/v1/completions\n"),
        entry(rid=b"\\", _7=None),
    ]
    bodies = record_bodies(tricky)
    assert len(bodies) == len(tricky)
    parsed = [json.loads('{"request_id":' + body.decode() + "}") for body in bodies]
    assert [p["request_id"] for p in parsed] == ['x"},{"request_id":"y', "abc123", "plain", "\\"]
    assert parsed[1]["model"] == '},{"request_id":'
    assert parsed[1]["backend"] == '"}]'
    assert parsed[2]["route"] == "/v1/completions\n"
    assert all("\n" not in body.decode() for body in bodies)  # a newline in a value is escaped: one line each


class LogFile:
    """A real file to write the log into, and what has been written so far."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)

    def lines(self) -> list[str]:
        return self.path.read_text().splitlines()


def test_the_writer_batches_and_formats_like_basic_config(tmp_path: Path) -> None:
    file = LogFile(tmp_path / "access.log")

    async def main() -> None:
        log = StreamAccessLog(file.fd)
        log.write(entry())
        log.write(entry(rid=b"second"))
        assert file.lines() == []  # nothing on the request path: the batch goes after FLUSH_S
        await asyncio.sleep(0.2)

    uvloop.run(main())
    lines = file.lines()
    assert len(lines) == 2
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(1_700_000_000))
    assert lines[0].startswith(f"{stamp},250 INFO switchyard.access: {{")
    assert json.loads(lines[1].split("switchyard.access: ", 1)[1])["request_id"] == "second"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO switchyard\.access: \{.*\}", lines[1])


def test_a_full_batch_goes_at_once(tmp_path: Path) -> None:
    file = LogFile(tmp_path / "access.log")

    async def main() -> None:
        log = StreamAccessLog(file.fd)
        for _ in range(FLUSH_ENTRIES - 1):
            log.write(entry())
        assert file.lines() == []
        log.write(entry())
        assert len(file.lines()) == FLUSH_ENTRIES  # without waiting for the timer
        log.write(entry())
        log.flush()  # what the lifespan does at shutdown
        assert len(file.lines()) == FLUSH_ENTRIES + 1

    uvloop.run(main())


def test_without_a_loop_a_line_is_written_at_once(tmp_path: Path) -> None:
    file = LogFile(tmp_path / "access.log")
    StreamAccessLog(file.fd).write(entry())  # a line written at shutdown, after the loop ended
    assert len(file.lines()) == 1


def test_a_closed_stderr_does_not_stop_the_gateway() -> None:
    read, write = os.pipe()
    os.close(read)
    os.close(write)
    log = StreamAccessLog(write)
    log.write(entry())  # no loop: written at once, into a closed descriptor
    log.flush()
