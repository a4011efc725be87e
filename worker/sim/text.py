"""Deterministic stand-ins for a tokenizer, a chat template, sampled text and embeddings.

- Tokenizer: the text is cut into pieces of 4 characters (the last may be shorter); a piece's
  token id is crc32(piece) mod 32000. Equal text prefixes give equal token prefixes, which is what
  prefix caching needs.
- Chat template (ChatML-like): each message renders as `<|im_start|>{role}\\n{content}<|im_end|>\\n`,
  followed by `<|im_start|>assistant\\n` for the generation prompt.
- Output text: words drawn from a fixed list by a PRNG seeded from (model, prompt, seed); one word
  (with its leading space) is one token. Without `ignore_eos` the answer has a natural length of
  8-128 tokens (finish_reason "stop"), else it runs to max_tokens ("length").
- Embeddings: a Gaussian vector seeded from (model, input), scaled to unit length.
"""

from __future__ import annotations

import base64
import math
import random
import struct
import zlib
from dataclasses import dataclass

CHARS_PER_TOKEN = 4
VOCAB_SIZE = 32000
MIN_NATURAL_TOKENS = 8
MAX_NATURAL_TOKENS = 128

_WORDS = tuple(
    """
    the of and to in is was for on that with as by at from it an be this which or are have has not
    but were their more one all can its also new other time been would first into two after only
    model token batch cache block prefix route queue server engine stream latency request answer
    """.split()  # noqa: SIM905 -- a word list reads better as text
)

_SPACED_WORDS = tuple(" " + w for w in _WORDS)


def _crc(text: str) -> int:
    return zlib.crc32(text.encode("utf-8", "surrogatepass"))


def token_pieces(text: str) -> list[str]:
    return [text[i : i + CHARS_PER_TOKEN] for i in range(0, len(text), CHARS_PER_TOKEN)]


def tokenize(text: str) -> list[int]:
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) == len(text):  # ASCII: slice the bytes once encoded (the common, fast case)
        crc = zlib.crc32
        return [crc(raw[i : i + CHARS_PER_TOKEN]) % VOCAB_SIZE for i in range(0, len(raw), CHARS_PER_TOKEN)]
    return [_crc(piece) % VOCAB_SIZE for piece in token_pieces(text)]


def render_chat(messages: list[tuple[str, str]], add_generation_prompt: bool = True) -> str:
    parts = [f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages]
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


@dataclass(frozen=True)
class Completion:
    """The text a request will produce: one string per token, and why it ends."""

    pieces: list[str]
    finish_reason: str  # "stop" | "length"
    stop_reason: str | None  # the matched stop string, when one ended the text


def sample_completion(
    model: str,
    prompt_token_ids: list[int],
    max_tokens: int,
    seed: int | None,
    stop: list[str],
    ignore_eos: bool,
    rng: random.Random,
) -> Completion:
    """Deterministic for a given (model, prompt, seed); `rng` is only used when seed is None."""
    base = seed if seed is not None else rng.getrandbits(32)
    digest = zlib.crc32(struct.pack(f"<{len(prompt_token_ids)}I", *prompt_token_ids), _crc(model))
    gen = random.Random(digest ^ (base * 0x9E3779B1))
    natural = gen.randint(MIN_NATURAL_TOKENS, MAX_NATURAL_TOKENS)
    count = max_tokens if ignore_eos else min(natural, max_tokens)
    pieces = gen.choices(_SPACED_WORDS, k=count)
    finish = "length" if count == max_tokens else "stop"
    if stop:
        text = ""
        for i, piece in enumerate(pieces):
            text += piece
            for s in stop:
                at = text.find(s)
                if at >= 0:
                    # keep the text before the stop string; the last piece is cut to fit
                    kept = text[:at]
                    prefix_len = len(text) - len(piece)
                    last = kept[prefix_len:] if at > prefix_len else ""
                    return Completion([*pieces[:i], last], "stop", s)
    return Completion(pieces, finish, None)


def embedding(model: str, text: str, dim: int) -> list[float]:
    gen = random.Random(_crc(model) ^ (_crc(text) << 1))
    vec = [gen.gauss(0.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


def embedding_base64(vec: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode("ascii")
