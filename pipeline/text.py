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
    """The text a document is embedded as: `title + " " + text`, stripped, when it has a title
    (as MTEB and BEIR do); the text unchanged otherwise."""
    if title is None or not title.strip():
        return clean_text(text)
    return clean_text(f"{title} {text}".strip())


def content_hash(text: str) -> str:
    """sha256 of the exact embedded text: equal hashes mean the stored vectors are still valid."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class Chunk:
    index: int
    text: str
    char_start: int
    char_end: int


def window_starts(n_tokens: int, window: int, overlap: int) -> range:
    """Start token of each window: consecutive windows share `overlap` tokens, the last one ends
    at the last token, and no window holds only tokens that its predecessor already had."""
    if overlap >= window:
        raise ValueError(f"overlap ({overlap}) must be smaller than the window ({window})")
    return range(0, max(n_tokens - overlap, 1), window - overlap)


def chunk_text(
    text: str,
    offsets: Sequence[tuple[int, int]],
    capacity: int,
    window: int,
    overlap: int,
    truncate: bool,
) -> list[Chunk]:
    """Split `text` by its content tokens' character `offsets` (no special tokens).

    A text of at most `capacity` tokens is one chunk, the whole text. Longer texts are cut into
    windows of `window` tokens, or, with `truncate`, cut to their first `capacity` tokens.
    """
    n_tokens = len(offsets)
    if n_tokens <= capacity:
        return [Chunk(0, text, 0, len(text))]
    if truncate:
        end = offsets[capacity - 1][1]
        return [Chunk(0, text[:end], 0, end)]
    chunks = []
    for index, start in enumerate(window_starts(n_tokens, window, overlap)):
        last = min(start + window, n_tokens) - 1
        char_start = offsets[start][0]
        char_end = max(offsets[last][1], char_start)
        chunks.append(Chunk(index, text[char_start:char_end], char_start, char_end))
    return chunks
