"""Server-sent events' framing: the separator a stream uses, and the start of an event held until its end."""

from __future__ import annotations

import pytest

from gateway.proxy.sse import CRLF_SEP, SEP, joined_if_ended, separator


def test_the_separator_is_that_of_the_first_whole_event() -> None:
    assert separator(b"data: 1\n\ndata: 2") == SEP
    assert separator(b"data: 1\r\n\r\ndata: 2") == CRLF_SEP
    assert separator(b"data: 1\r\n") is None
    assert separator(b"") is None


@pytest.mark.parametrize("sep", [SEP, CRLF_SEP])
@pytest.mark.parametrize("known", [True, False])
def test_an_event_is_joined_once_when_its_end_comes_however_it_is_cut(sep: bytes, known: bool) -> None:
    event = b"data: " + b"x" * 40 + sep
    for size in (1, 2, 3, 5, 13):
        pieces = [event[i : i + size] for i in range(0, len(event), size)]
        held: list[bytes] = [pieces[0]]
        for index, piece in enumerate(pieces[1:], start=1):
            joined = joined_if_ended(held, piece, sep if known else None)
            if index < len(pieces) - 1 and sep not in b"".join(pieces[: index + 1]):
                assert joined is None
                assert held == pieces[: index + 1]  # kept as read, not copied into one
            else:
                assert joined == b"".join(pieces[: index + 1])
                assert held == []
                break
        else:
            pytest.fail("the event's end was not seen")


def test_a_separator_of_another_kind_does_not_end_a_known_framing() -> None:
    held = [b"data: 1\r"]
    assert joined_if_ended(held, b"\ndata", SEP) is None  # "\r\n" is no LF blank line
    assert joined_if_ended(held, b"\n\n", SEP) == b"data: 1\r\ndata\n\n"
