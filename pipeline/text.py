"""Pure text work: the document text that gets embedded, its content hash, and token-window chunks
with character offsets. No Spark, no model."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

# C0 controls except tab, newline and carriage return, DEL, and the byte-order mark.
_CONTROL_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufeff]")


def clean_text(text: str) -> str:
    """Replace control characters and BOMs with spaces, one for one, so offsets still map back
    to the source text."""
    return _CONTROL_CHARS.sub(" ", text)


def document_text(text: str, title: str | None = None) -> str:
    """The text a document is embedded as: `title + " " + text`, cleaned, then stripped, when it
    has a title (as MTEB and BEIR do); the cleaned text otherwise. `pipeline.spark.io` computes
    the same in Spark SQL, and a test holds the two equal."""
    if title is None or not title.strip():
        return clean_text(text)
    return clean_text(f"{title} {text}").strip()


def content_hash(text: str) -> str:
    """sha256 of the exact embedded text: equal hashes mean the stored vectors are still valid."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class Chunk:
    index: int
    text: str
    char_start: int
    char_end: int


def token_windows(
    offsets: Sequence[tuple[int, int]], text: str, window: int, overlap: int
) -> list[tuple[int, int]]:
    """[start, end) token ranges of at most `window` tokens that cover every token. Consecutive
    windows share at least `overlap` tokens. Cuts move back to a word boundary when one lies
    within a quarter window, so chunks do not start or end inside a word."""
    if overlap >= window:
        raise ValueError(f"overlap ({overlap}) must be smaller than the window ({window})")
    n_tokens = len(offsets)
    slack = window // 4
    windows: list[tuple[int, int]] = []
    start, previous_end = 0, 0
    while True:
        end = min(start + window, n_tokens)
        if end < n_tokens:
            floor = max(start + 1, end - slack, previous_end + 1)
            end = _word_start(offsets, text, end, floor)
        windows.append((start, end))
        if end >= n_tokens:
            return windows
        next_start = end - overlap
        start = max(_word_start(offsets, text, next_start, next_start - slack), start + 1)
        previous_end = end


def _word_start(offsets: Sequence[tuple[int, int]], text: str, index: int, floor: int) -> int:
    """The nearest token at or before `index` (not before `floor`) that begins a word."""
    for candidate in range(index, floor - 1, -1):
        char = offsets[candidate][0]
        if char == 0 or text[char - 1].isspace() or offsets[candidate - 1][1] < char:
            return candidate
    return index


def chunk_text(
    text: str,
    offsets: Sequence[tuple[int, int]],
    capacity: int,
    window: int,
    overlap: int,
    truncate: bool,
) -> list[Chunk]:
    """Split `text` by its content tokens' character `offsets` (no special tokens).

    With `truncate`, a text longer than `capacity` tokens is cut to its first `capacity` tokens.
    Otherwise a text longer than `window` tokens is cut into windows of at most `window` tokens
    (window <= capacity). Either way a text that fits is one chunk, the whole text.
    """
    n_tokens = len(offsets)
    if n_tokens <= (capacity if truncate else window):
        return [Chunk(0, text, 0, len(text))]
    if truncate:
        end = offsets[capacity - 1][1]
        return [Chunk(0, text[:end], 0, end)]
    chunks = []
    for index, (start, end) in enumerate(token_windows(offsets, text, window, overlap)):
        char_start = offsets[start][0]
        char_end = max(offsets[end - 1][1], char_start)
        chunks.append(Chunk(index, text[char_start:char_end], char_start, char_end))
    return chunks
