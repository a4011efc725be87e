"""Deterministic stand-ins for a tokenizer, a chat template and embeddings.

- Tokenizer: `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` are special tokens (ids 0, 1, 2) and a newline is a
  token of its own (id 3); every other run of text is cut into pieces of 4 characters (the last may be
  shorter), counted from the run's start, i.e. from the text's start or just after a newline or special token.
  A piece is an answer word (one of `ANSWER_WORDS`, ids 16..79), a position token (`POSITION_TOKENS`, ids
  128..10127) or otherwise id `PIECE_BASE + crc32(piece) % 32000`. Equal text prefixes give equal token
  prefixes (what prefix caching needs), and text that starts a run on the grid -- such as a generated answer
  right after the chat template's `<|im_start|>assistant\\n` -- tokenizes back to exactly the ids it was
  generated from (what continuing a partial answer needs).
- Chat template (ChatML): each message renders as `<|im_start|>{role}\\n{content}<|im_end|>\\n`, followed by
  `<|im_start|>assistant\\n` for the generation prompt; `continue_final_message` leaves the last message open
  (no `<|im_end|>\\n`), as Hugging Face's `apply_chat_template` does.
- Embeddings: a Gaussian vector seeded from (model, input), scaled to unit length.
"""

from __future__ import annotations

import base64
import math
import random
import re
import struct
import zlib
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

CHARS_PER_TOKEN = 4
SPECIAL_TOKENS: Mapping[str, int] = MappingProxyType({"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2})
EOS_ID = 2  # <|im_end|>, as for ChatML models
NEWLINE_ID = 3
WORD_BASE = 16
POSITION_BASE = 128
MAX_POSITIONS = 10_000  # position tokens are the numbers 0..9999, right-aligned in 4 characters
PIECE_BASE = POSITION_BASE + MAX_POSITIONS + 112
PIECE_RANGE = 32_000
VOCAB_SIZE = PIECE_BASE + PIECE_RANGE

# One answer word is one token: a space and three letters, so an answer is a run of 4-character pieces.
ANSWER_WORDS = tuple(
    " " + w
    for w in """
    the and for are but not you all any can had her was one our out day get has him his how man new now
    old see two way who its let put say she too use top end job key log map row run set bit net big low
    few far yet ask add api gpu hit lru tcp ttl rpc sse raw
    """.split()  # noqa: SIM905 -- a word list reads better as text
)
POSITION_TOKENS = tuple(f"{i:>4}" for i in range(MAX_POSITIONS))
# a constant table, never written to (a plain dict: tokenizing looks it up once a piece)
_PIECE_IDS: Final[dict[bytes, int]] = {w.encode(): WORD_BASE + i for i, w in enumerate(ANSWER_WORDS)} | {
    p.encode(): POSITION_BASE + i for i, p in enumerate(POSITION_TOKENS)
}
# text of each id below PIECE_BASE that the sampler produces: answer words, positions, and EOS (a special
# token: no visible text); other ids there are never sampled
ANSWER_TEXTS = tuple(
    ANSWER_WORDS[i - WORD_BASE] if WORD_BASE <= i < WORD_BASE + len(ANSWER_WORDS)
    else POSITION_TOKENS[i - POSITION_BASE] if i >= POSITION_BASE
    else ""
    for i in range(POSITION_BASE + MAX_POSITIONS)
)  # fmt: skip
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(s) for s in SPECIAL_TOKENS) + ")")


def _crc(text: str) -> int:
    return zlib.crc32(text.encode("utf-8", "surrogatepass"))


def _runs(text: str) -> list[str]:
    """The text split at special tokens (kept, at odd indices), so each even item is plain text."""
    return _SPECIAL_RE.split(text) if "<|" in text else [text]


def _line_ids(line: str, out: list[int]) -> None:
    get, crc = _PIECE_IDS.get, zlib.crc32
    raw = line.encode("utf-8", "surrogatepass")
    if len(raw) == len(line):  # ASCII: slice the encoded bytes (the common, fast case)
        pieces = [raw[i : i + CHARS_PER_TOKEN] for i in range(0, len(raw), CHARS_PER_TOKEN)]
    else:
        pieces = [line[i : i + CHARS_PER_TOKEN].encode("utf-8", "surrogatepass")
                  for i in range(0, len(line), CHARS_PER_TOKEN)]  # fmt: skip
    out += [get(piece) or PIECE_BASE + crc(piece) % PIECE_RANGE for piece in pieces]  # no table id is 0


def tokenize(text: str) -> list[int]:
    out: list[int] = []
    for i, run in enumerate(_runs(text)):
        if i % 2:
            out.append(SPECIAL_TOKENS[run])
            continue
        for j, line in enumerate(run.split("\n")):
            if j:
                out.append(NEWLINE_ID)
            if line:
                _line_ids(line, out)
    return out


def token_pieces(text: str) -> list[str]:
    """The text of each token `tokenize(text)` returns (for /tokenize's `return_token_strs`)."""
    out: list[str] = []
    for i, run in enumerate(_runs(text)):
        if i % 2:
            out.append(run)
            continue
        for j, line in enumerate(run.split("\n")):
            if j:
                out.append("\n")
            out += [line[k : k + CHARS_PER_TOKEN] for k in range(0, len(line), CHARS_PER_TOKEN)]
    return out


def render_chat(
    messages: list[tuple[str, str]], add_generation_prompt: bool = True, continue_final_message: bool = False
) -> str:
    parts = [f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages]
    if continue_final_message and messages:
        role, content = messages[-1]
        parts[-1] = f"<|im_start|>{role}\n{content}"
    elif add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def embedding(model: str, text: str, dim: int) -> list[float]:
    gen = random.Random(_crc(model) ^ (_crc(text) << 1))
    vec = [gen.gauss(0.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


def embedding_base64(vec: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode("ascii")
