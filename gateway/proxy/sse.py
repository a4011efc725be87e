"""Server-sent events as backends write them: how events are separated, and how a stream ends.

vLLM ends each event with a blank line of LFs (`\\n\\n`). The SSE format also allows CRLF line ends, which
other OpenAI-compatible servers (sse-starlette's default among them) use: a stream's separator is read off
its first whole event, so events are cut where that server cuts them. Events the gateway writes itself (an
error, an ending) use LFs; SSE readers take each line's end as it comes.
"""

from __future__ import annotations

import re

SEP = b"\n\n"
CRLF_SEP = b"\r\n\r\n"
DONE = b"data: [DONE]" + SEP
ENDS = (DONE, b"data: [DONE]" + CRLF_SEP)  # what the last bytes of a finished chat or completions stream are
# A Responses API stream has no [DONE]: its last event is one of these (the event line, outside any JSON).
RESPONSES_END = re.compile(rb"(?:^|\n)event: response\.(?:completed|incomplete|failed)\r?\n")


def separator(data: bytes) -> bytes | None:
    """The separator of the first whole event in `data` (None: no event ends in it yet)."""
    if SEP in data:
        return SEP
    if CRLF_SEP in data:
        return CRLF_SEP
    return None


def joined_if_ended(held: list[bytes], chunk: bytes, sep: bytes | None) -> bytes | None:
    """`held` (the start of an event, as the reads brought it) and `chunk`, joined, if `chunk` ends an event
    (its separator in `chunk`, or across the two; `sep` None: either); `held` is then emptied. Else None, and
    `chunk` is held too. An event read in many pieces is so copied once, not once per read: 16 MB of prompt
    logprobs in 64 KB reads took 4 s of copying that way, the event loop stalled."""
    held.append(chunk)
    if sep is None or sep not in chunk:  # else the usual case: the event ends in this read
        edge = b"".join(held[-4:-1])[-3:] + chunk[:3]  # a separator's first bytes may end the held ones
        if not any(end in chunk or end in edge for end in ((SEP, CRLF_SEP) if sep is None else (sep,))):
            return None
    data = b"".join(held)
    held.clear()
    return data


def whole_events(held: list[bytes], chunk: bytes, sep: bytes | None) -> tuple[bytes, bytes, int] | None:
    """The events `chunk` completes, with the held start of the first: (data, the stream's separator, end),
    data[:end] being whole events; what follows the last one is held. None: no event ends yet (all held)."""
    data = joined_if_ended(held, chunk, sep) if held else chunk
    if data is None:
        return None
    sep = sep or separator(data)
    if sep is None or (last := data.rfind(sep)) < 0:
        held.append(data)
        return None
    end = last + len(sep)
    if end < len(data):
        held.append(data[end:])
    return data, sep, end
