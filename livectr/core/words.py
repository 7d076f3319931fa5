"""Item words: the one tokenizer and word hash shared by the semantic refresher, the join and the learner.

Why here (core): the words are computed once, where an item's text is known (the semantic
refresher), travel as bytes on :class:`~livectr.core.events.Example`, and are hashed into the
learner's user × word table; every stage must agree on the tokens and their hashes, across
processes. Tokens are lowercase alphanumeric runs (Unicode letters and digits), deduplicated
in order of appearance and capped at ``max_words``; each is hashed with ``zlib.crc32`` (stable
across processes, unlike Python's salted ``hash``). Hash 0 is reserved for padding, so a token
hashing to 0 is mapped to 1. On the wire the hashes are little-endian ``uint32`` bytes.
"""

from __future__ import annotations

import re
import zlib

import numpy as np

_TOKEN = re.compile(r"[^\W_]+")
#: The wire dtype of a word hash.
WORD_DTYPE = np.dtype("<u4")


def tokenize(text: str, max_words: int) -> list[str]:
    """The first ``max_words`` distinct lowercase alphanumeric tokens of ``text``."""
    out: list[str] = []
    seen: set[str] = set()
    if max_words <= 0:
        return out
    for token in _TOKEN.findall(text.lower()):
        if token not in seen:
            seen.add(token)
            out.append(token)
            if len(out) >= max_words:
                break
    return out


def word_hash(token: str) -> int:
    """Stable 32-bit hash of a token; never 0 (the padding value)."""
    return zlib.crc32(token.encode("utf-8")) or 1


def pack_words(text: str, max_words: int) -> bytes:
    """The wire form of ``text``'s words: their hashes as little-endian uint32 bytes."""
    hashes = [word_hash(t) for t in tokenize(text, max_words)]
    return np.asarray(hashes, dtype=WORD_DTYPE).tobytes()


def unpack_words(data: bytes | None) -> np.ndarray:
    """Word hashes (uint32) from their wire form; empty for None. A length that is not a
    multiple of 4 is malformed: ``ValueError``."""
    if not data:
        return np.zeros(0, dtype=WORD_DTYPE)
    if len(data) % WORD_DTYPE.itemsize:
        raise ValueError(f"item words of {len(data)} bytes: not a multiple of {WORD_DTYPE.itemsize}")
    return np.frombuffer(data, dtype=WORD_DTYPE)
