"""The simulated model's answers: autoregressive and deterministic, so a stream can be continued elsewhere.

Each next token is a pure function of (model name, seed, every token before it): a crc32 of the whole context
(prompt and answer so far, as 4-byte little-endian ids) chained from a crc32 of the model name and seed,
then mixed. Nothing depends on where the prompt ended, so continuing from the prompt plus the first k answer
tokens gives exactly the tokens the uninterrupted request gives from position k on.

- An answer is a run of answer tokens (`text.ANSWER_WORDS`, one word a token). EOS (`text.EOS_ID`, counted in
  completion_tokens as vLLM counts it) may come once the context ends with at least 7 answer tokens (with
  probability 1/60 a step) and always comes after 127: a fresh answer has 8-128 tokens; a continuation has
  fewer, as its prompt already ends with answer tokens. `ignore_eos` turns EOS off.
- Positional mode (`--positional-output`): the answer token at run position i is the position token i (text
  `f"{i:>4}"`), i counting the position tokens the context already ends with, so a continuation carries on
  the numbering and a duplicated or missing token shows in the text.
- Stop strings end the answer on the token whose text completes one (that token is kept, its text cut before
  the stop string), as vLLM does.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from worker.sim.text import ANSWER_TEXTS, ANSWER_WORDS, EOS_ID, MAX_POSITIONS, POSITION_BASE, WORD_BASE

MIN_RUN_BEFORE_EOS = 7
MAX_RUN = 127
EOS_CHANCE_16 = 65536 // 60  # P(EOS) per step once allowed, in 1/65536
_M64 = (1 << 64) - 1
_NEVER = 1 << 62  # a run length no context reaches
_GOLDEN = 0x9E3779B97F4A7C15  # multiplying the 32-bit context crc by it spreads it over 64 bits
_WORD_IDS = tuple(WORD_BASE + i for i in range(len(ANSWER_WORDS)))
_ID_BYTES = tuple(i.to_bytes(4, "little") for i in range(POSITION_BASE + MAX_POSITIONS))


@dataclass(frozen=True)
class Completion:
    """What a request will produce: token ids, the visible text of each, and why it ends."""

    token_ids: list[int]
    pieces: list[str]  # text per token: EOS is "", a stop-cut last token keeps the text before the stop string
    finish_reason: str  # "stop" | "length"
    stop_reason: str | None  # the matched stop string, when one ended the text


def context_hash(model: str, seed: int, token_ids: list[int]) -> int:
    start = zlib.crc32((seed & _M64).to_bytes(8, "little"), zlib.crc32(model.encode()))
    return zlib.crc32(struct.pack(f"<{len(token_ids)}I", *token_ids), start)


def trailing_run(token_ids: list[int], positional: bool) -> int:
    """How many answer tokens (position tokens in positional mode) the context ends with."""
    lo, hi = (
        (POSITION_BASE, POSITION_BASE + MAX_POSITIONS) if positional else (WORD_BASE, WORD_BASE + len(ANSWER_WORDS))
    )
    run = 0
    for token in reversed(token_ids):
        if not lo <= token < hi:
            break
        run += 1
    return run


def sample(
    model: str,
    context: list[int],
    max_tokens: int,
    seed: int,
    *,
    stop: list[str] | None = None,
    ignore_eos: bool = False,
    positional: bool = False,
) -> Completion:
    h = context_hash(model, seed, context)
    run = trailing_run(context, positional)
    ids: list[int] = []
    crc, words, n_words, id_bytes = zlib.crc32, _WORD_IDS, len(_WORD_IDS), _ID_BYTES
    eos_from = _NEVER if ignore_eos else MIN_RUN_BEFORE_EOS
    last_position = POSITION_BASE + MAX_POSITIONS - 1
    for _ in range(max_tokens):
        r = (h * _GOLDEN) & _M64
        if run >= eos_from and (run >= MAX_RUN or (r >> 48) < EOS_CHANCE_16):
            ids.append(EOS_ID)
            break
        token = min(POSITION_BASE + run, last_position) if positional else words[(r >> 24) % n_words]
        ids.append(token)
        run += 1
        h = crc(id_bytes[token], h)
    texts = ANSWER_TEXTS
    pieces = [texts[t] for t in ids]
    if stop:
        cut = _apply_stop(ids, pieces, stop)
        if cut is not None:
            return cut
    finish = "stop" if ids and ids[-1] == EOS_ID else "length"
    return Completion(ids, pieces, finish, None)


def _apply_stop(ids: list[int], pieces: list[str], stop: list[str]) -> Completion | None:
    text = ""
    for i, piece in enumerate(pieces):
        prefix_len = len(text)
        text += piece
        for s in stop:
            at = text.find(s, max(0, prefix_len - len(s) + 1))
            if at >= 0:
                # keep the text before the stop string; the last token's text is cut to fit
                last = text[prefix_len:at] if at > prefix_len else ""
                return Completion(ids[: i + 1], [*pieces[:i], last], "stop", s)
    return None
