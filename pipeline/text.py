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
    if title is None or not clean_text(title).strip():
        return clean_text(text)
    return clean_text(f"{title} {text}").strip()


def content_hash(text: str) -> str:
    """sha256 of the exact embedded text: equal hashes mean the stored vectors are still valid."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class Chunk:
    """A piece of a document: its text, where it lies in the document (characters), and which of
    the document's content tokens it holds ([token_start, token_end)). `clean_cut`: both ends lie
    at word starts, where a tokenizer's pieces of the two sides are its pieces of the whole."""

    index: int
    text: str
    char_start: int
    char_end: int
    token_start: int = 0
    token_end: int = 0
    clean_cut: bool = True


def word_starts(offsets: Sequence[tuple[int, int]], word_ids: Sequence[int | None]) -> list[bool]:
    """For each token: may a chunk begin there? It must begin one of the tokenizer's words
    (pre-tokenizer pieces, which it tokenizes independently) and share no character with the
    token before it (byte-level tokens of one emoji do)."""
    return [i == 0 or (word_ids[i] != word_ids[i - 1] and offsets[i - 1][1] <= offsets[i][0])
            for i in range(len(offsets))]


def text_word_starts(offsets: Sequence[tuple[int, int]], text: str) -> list[bool]:
    """Word starts judged from the text alone, for offsets without the tokenizer's words: a token
    after a space, or after a gap."""
    return [i == 0 or offsets[i][0] == 0 or text[offsets[i][0] - 1].isspace()
            or offsets[i - 1][1] < offsets[i][0] for i in range(len(offsets))]


def token_windows(
    offsets: Sequence[tuple[int, int]], text: str, window: int, overlap: int,
    starts: Sequence[bool] | None = None,
) -> list[tuple[int, int]]:
    """[start, end) token ranges of at most `window` tokens that cover every token. Consecutive
    windows share at least `overlap` tokens. Cuts move back to a word start (`starts`, else
    judged from the text) when one lies within a quarter window, so chunks do not start or end
    inside a word."""
    if overlap >= window:
        raise ValueError(f"overlap ({overlap}) must be smaller than the window ({window})")
    starts = text_word_starts(offsets, text) if starts is None else starts
    n_tokens = len(offsets)
    slack = window // 4
    windows: list[tuple[int, int]] = []
    start, previous_end = 0, 0
    while True:
        end = min(start + window, n_tokens)
        if end < n_tokens:
            end = _word_start(starts, end, max(start + 1, end - slack, previous_end + 1))
        windows.append((start, end))
        if end >= n_tokens:
            return windows
        next_start = end - overlap
        start = max(_word_start(starts, next_start, next_start - slack), start + 1)
        previous_end = end


def _word_start(starts: Sequence[bool], index: int, floor: int) -> int:
    """The nearest token at or before `index` (not before `floor`) that begins a word."""
    for candidate in range(index, max(floor, 0) - 1, -1):
        if starts[candidate]:
            return candidate
    return index


def chunk_text(
    text: str,
    offsets: Sequence[tuple[int, int]],
    capacity: int,
    window: int,
    overlap: int,
    truncate: bool,
    starts: Sequence[bool] | None = None,
) -> list[Chunk]:
    """Split `text` by its content tokens' character `offsets` (no special tokens).

    With `truncate`, a text longer than `capacity` tokens is cut at the last word start within
    its first `capacity` tokens. Otherwise a text longer than `window` tokens is cut into windows
    of at most `window` tokens (window <= capacity). Either way a text that fits is one chunk,
    the whole text.
    """
    n_tokens = len(offsets)
    if n_tokens <= (capacity if truncate else window):
        return [Chunk(0, text, 0, len(text), 0, n_tokens)]
    starts = text_word_starts(offsets, text) if starts is None else starts
    if truncate:
        spans = [(0, _word_start(starts, capacity, 1))]
    else:
        spans = token_windows(offsets, text, window, overlap, starts)
    return [_chunk(index, text, offsets, starts, start, end)
            for index, (start, end) in enumerate(spans)]


def _chunk(index: int, text: str, offsets: Sequence[tuple[int, int]], starts: Sequence[bool],
           start: int, end: int) -> Chunk:
    char_start = offsets[start][0]
    char_end = max(_span_end(text, offsets, end), char_start)
    clean = starts[start] and (end == len(offsets) or starts[end])
    return Chunk(index, text[char_start:char_end], char_start, char_end, start, end, clean)


def _span_end(text: str, offsets: Sequence[tuple[int, int]], end: int) -> int:
    """Where a chunk of tokens [.., end) ends in the text: after its last token, and after any
    characters no token covers up to the next token but whitespace (a normaliser can leave a
    combining mark outside every token's offsets)."""
    last = offsets[end - 1][1]
    following = offsets[end][0] if end < len(offsets) else len(text)
    gap = text[last:following]
    return last + len(gap.rstrip()) if gap.strip() else last
