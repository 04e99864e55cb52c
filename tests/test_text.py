"""Document text, content hashes and token-window chunks with character offsets."""

from __future__ import annotations

import hashlib
import itertools
import random
import re

import pytest

from pipeline.text import chunk_text, clean_text, content_hash, document_text, token_windows

TEXT = (
    "Apache Spark is a unified analytics engine for large-scale data processing.\n"
    "It provides high-level APIs in Java, Scala, Python and R,\tand an optimized engine "
    "that supports general execution graphs. 東京 is a city. Delta Lake 🚀 adds ACID tables "
    "on top of Parquet files, with time travel and schema enforcement."
)
WINDOW_OVERLAPS = [(1, 0), (2, 0), (2, 1), (3, 1), (5, 0), (5, 2), (5, 4), (8, 3), (16, 15)]
# (n_tokens, window, overlap): short texts, exact fits, one past a window, no overlap, big overlap.
WINDOW_CASES = [
    (n, window, overlap)
    for window, overlap in WINDOW_OVERLAPS
    for n in sorted({1, 2, window - 1, window, window + 1, 2 * window, 2 * window + 1, 37, 100})
    if n >= 1
]


def word_offsets(text: str) -> list[tuple[int, int]]:
    """Synthetic token offsets: one token per whitespace-separated word."""
    return [match.span() for match in re.finditer(r"\S+", text)]


def subword_offsets(
    text: str, seed: int, longest: int = 4
) -> tuple[list[tuple[int, int]], set[int]]:
    """Synthetic subword offsets (each word cut into pieces of 1..longest characters), and the
    indexes of the tokens that begin a word."""
    rng = random.Random(seed)
    offsets: list[tuple[int, int]] = []
    word_starts: set[int] = set()
    for match in re.finditer(r"\S+", text):
        word_starts.add(len(offsets))
        position, end = match.span()
        while position < end:
            piece_end = min(end, position + rng.randint(1, longest))
            offsets.append((position, piece_end))
            position = piece_end
    return offsets, word_starts


def reference_windows(n_tokens: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """Fixed-stride windows: what token_windows gives when every token begins a word."""
    starts = range(0, max(n_tokens - overlap, 1), window - overlap)
    return [(start, min(start + window, n_tokens)) for start in starts]


def words_text(n_words: int) -> str:
    return " ".join(f"w{i}" for i in range(n_words))


def test_document_text_joins_title_and_text_with_one_space() -> None:
    assert document_text("Body text.", "Title") == "Title Body text."


def test_document_text_strips_the_joined_text() -> None:
    assert document_text("body  \n", "  Title") == "Title body"
    assert document_text("", "Title") == "Title"


@pytest.mark.parametrize("title", [None, "", "   ", "\n\t"])
def test_document_text_without_title_is_the_text_unchanged(title: str | None) -> None:
    assert document_text("  spaced body \n", title) == "  spaced body \n"


def test_document_text_cleans_control_characters_in_title_and_text() -> None:
    assert document_text("a\x00b", "t\ufeff") == "t  a b"
    assert document_text("a\x07b") == "a b"


def test_clean_text_replaces_controls_and_bom_one_for_one() -> None:
    dirty = "\ufeffab\x00c\x01\x08d\x0b\x0c\x0e\x1fe\x7f"
    cleaned = clean_text(dirty)
    assert cleaned == " ab c  d    e "
    assert len(cleaned) == len(dirty)
    for i, char in enumerate(dirty):
        if cleaned[i] != " ":
            assert cleaned[i] == char


def test_clean_text_keeps_tab_newline_return_emoji_and_cjk() -> None:
    text = "tab\there\nline\r\nend 🚀 東京 café — naïve"
    assert clean_text(text) == text


def test_content_hash_is_sha256_hex_of_utf8() -> None:
    text = "Delta Lake 🚀 東京"
    digest = content_hash(text)
    assert digest == hashlib.sha256(text.encode("utf-8")).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert content_hash("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_content_hash_is_stable_and_changes_with_the_text() -> None:
    # recorded once: a table's stored hashes keep matching across processes and releases
    assert content_hash("same text") == (
        "2e68a7bba11b90d1bae1daea2dd4951779cf45d5897c62539d01f44054bcb1e0")
    hashes = {content_hash(t) for t in ["a", "a ", "A", "b", "ab", "Title a"]}
    assert len(hashes) == 6


def assert_windows_cover_and_advance(
    windows: list[tuple[int, int]], n_tokens: int, window: int
) -> None:
    assert windows[0][0] == 0
    assert windows[-1][1] == n_tokens, "the last window does not end at the last token"
    assert all(0 < end - start <= window for start, end in windows)
    covered = set().union(*(range(start, end) for start, end in windows))
    assert covered == set(range(n_tokens))
    for (start, _), (next_start, _) in itertools.pairwise(windows):
        assert next_start > start


@pytest.mark.parametrize(("n_tokens", "window", "overlap"), WINDOW_CASES)
def test_word_windows_cover_every_token_and_share_exactly_the_overlap(
    n_tokens: int, window: int, overlap: int
) -> None:
    text = words_text(n_tokens)
    windows = token_windows(word_offsets(text), text, window, overlap)
    assert_windows_cover_and_advance(windows, n_tokens, window)
    for index, ((_, end), (next_start, next_end)) in enumerate(itertools.pairwise(windows)):
        assert next_end > end, "a window holds only tokens its predecessor had"
        if index + 2 == len(windows):
            assert end - next_start >= overlap
        else:
            assert end - next_start == overlap
            assert next_end - next_start == window
    if n_tokens <= window:
        assert windows == [(0, n_tokens)]
    assert windows == reference_windows(n_tokens, window, overlap)


def test_one_token_past_a_window_gives_two_windows() -> None:
    text = words_text(9)
    assert token_windows(word_offsets(text), text, 8, 3) == [(0, 8), (5, 9)]
    assert token_windows(word_offsets(text), text, 8, 0) == [(0, 8), (8, 9)]
    assert token_windows(word_offsets(text), text, 9, 3) == [(0, 9)]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    ("window", "overlap"),
    [(1, 0), (2, 1), (4, 0), (5, 2), (8, 3), (16, 4), (16, 15), (32, 8), (64, 16)],
)
def test_subword_windows_cover_every_token_and_cut_at_word_starts(
    seed: int, window: int, overlap: int
) -> None:
    offsets, word_starts = subword_offsets(TEXT, seed)
    n_tokens = len(offsets)
    windows = token_windows(offsets, TEXT, window, overlap)
    assert_windows_cover_and_advance(windows, n_tokens, window)
    slack = window // 4
    previous_ends = [0] + [end for _, end in windows]
    for (start, end), previous_end in zip(windows[:-1], previous_ends, strict=False):
        floor = max(start + 1, start + window - slack, previous_end + 1)
        near_cut = range(floor, start + window + 1)
        if word_starts.intersection(near_cut):
            assert end in word_starts, f"window ({start}, {end}) ends inside a word"
    for (start, end), (next_start, _) in itertools.pairwise(windows):
        near_start = range(max(start + 1, end - overlap - slack), end - overlap + 1)
        if word_starts.intersection(near_start):
            assert next_start in word_starts, f"window at {next_start} starts inside a word"


@pytest.mark.parametrize(
    ("word_len", "window", "overlap"),
    [
        (4, 16, 4),
        (3, 32, 8),
        (6, 64, 16),
        (6, 16, 8),
        (4, 8, 7),
    ],
)
def test_each_window_adds_new_tokens_and_keeps_the_overlap(
    word_len: int, window: int, overlap: int
) -> None:
    text = " ".join(["x" * word_len] * 40)
    offsets = [(i, i + 1) for i, char in enumerate(text) if char != " "]
    windows = token_windows(offsets, text, window, overlap)
    assert_windows_cover_and_advance(windows, len(offsets), window)
    for (_, end), (next_start, next_end) in itertools.pairwise(windows):
        assert next_end > end, "a window holds only tokens its predecessor had"
        assert end - next_start >= overlap


@pytest.mark.parametrize(("window", "overlap"), [(4, 4), (4, 5), (1, 1)])
def test_overlap_not_smaller_than_window_raises(window: int, overlap: int) -> None:
    offsets = word_offsets(TEXT)
    with pytest.raises(ValueError, match="overlap"):
        token_windows(offsets, TEXT, window, overlap)
    with pytest.raises(ValueError, match="overlap"):
        chunk_text(TEXT, offsets, 2, window, overlap, truncate=False)


@pytest.mark.parametrize(
    ("window", "overlap"), [(1, 0), (2, 1), (3, 0), (5, 2), (7, 6), (10, 3), (20, 5)]
)
def test_window_chunks_map_back_to_the_text_and_cover_it(window: int, overlap: int) -> None:
    offsets = word_offsets(TEXT)
    chunks = chunk_text(TEXT, offsets, window, window, overlap, truncate=False)
    spans = reference_windows(len(offsets), window, overlap)
    assert len(chunks) == len(spans) > 1
    assert [chunk.index for chunk in chunks] == list(range(len(chunks)))
    covered: set[int] = set()
    for chunk, (start, end) in zip(chunks, spans, strict=True):
        assert chunk.text == TEXT[chunk.char_start : chunk.char_end]
        assert chunk.text.strip()
        assert (chunk.char_start, chunk.char_end) == (offsets[start][0], offsets[end - 1][1])
        assert chunk.text.split() == TEXT.split()[start:end]
        covered.update(range(chunk.char_start, chunk.char_end))
    missing = [i for i, char in enumerate(TEXT) if not char.isspace() and i not in covered]
    assert missing == []
    assert chunks[-1].char_end == len(TEXT)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(("window", "overlap"), [(3, 1), (8, 2), (24, 6)])
def test_subword_chunks_map_back_to_the_text_and_cover_it(
    seed: int, window: int, overlap: int
) -> None:
    offsets, _ = subword_offsets(TEXT, seed)
    chunks = chunk_text(TEXT, offsets, window, window, overlap, truncate=False)
    assert [chunk.index for chunk in chunks] == list(range(len(chunks)))
    covered: set[int] = set()
    for chunk in chunks:
        assert chunk.text == TEXT[chunk.char_start : chunk.char_end]
        assert chunk.text.strip()
        covered.update(range(chunk.char_start, chunk.char_end))
    missing = [i for i, char in enumerate(TEXT) if not char.isspace() and i not in covered]
    assert missing == []


@pytest.mark.parametrize("capacity", [1, 2, 7, 20])
def test_truncate_keeps_one_prefix_chunk_ending_at_the_last_kept_token(capacity: int) -> None:
    offsets = word_offsets(TEXT)
    chunks = chunk_text(TEXT, offsets, capacity, capacity, 0, truncate=True)
    end = offsets[capacity - 1][1]
    assert len(chunks) == 1
    assert (chunks[0].index, chunks[0].char_start, chunks[0].char_end) == (0, 0, end)
    assert chunks[0].text == TEXT[:end]
    assert chunks[0].text.split() == TEXT.split()[:capacity]


@pytest.mark.parametrize("truncate", [False, True])
@pytest.mark.parametrize("extra", [0, 1, 50])
def test_text_within_the_window_is_one_chunk_of_the_whole_text(truncate: bool, extra: int
                                                               ) -> None:
    """The limit is the capacity when truncating, else the window (here both are the same)."""
    text = "  leading and trailing space are kept  \n"
    offsets = word_offsets(text)
    limit = len(offsets) + extra
    chunks = chunk_text(text, offsets, limit, limit, 1, truncate)
    assert len(chunks) == 1
    assert (chunks[0].index, chunks[0].text) == (0, text)
    assert (chunks[0].char_start, chunks[0].char_end) == (0, len(text))


def test_empty_text_is_one_empty_chunk() -> None:
    chunks = chunk_text("", [], 4, 4, 1, truncate=False)
    assert [(c.index, c.text, c.char_start, c.char_end) for c in chunks] == [(0, "", 0, 0)]


def test_text_longer_than_the_window_is_split_even_within_capacity() -> None:
    text = words_text(10)
    chunks = chunk_text(text, word_offsets(text), 100, 4, 1, truncate=False)
    assert len(chunks) == 3
    assert chunk_text(text, word_offsets(text), 100, 4, 1, truncate=True)[0].text == text



# Titles and texts the Spark SQL twin must treat as document_text does: control characters, BOMs,
# Unicode spaces (which the joined text is stripped of), empty, blank and null titles.
TWIN_TITLES = [None, "", " ", "\t", "\u3000", "\u00a0", "\u2003\u2009", "\x01", "\ufeff",
               "Title", " Title ", "\u2003Title\u3000", "\ufeffTitle\x07", "東京 🚀"]
TWIN_TEXTS = ["body", "  body  ", "", " ", "\ufeffBOM first", "ctrl\x01\x02\x1f mid\x7f",
              "tab\tnew\nline\r\n", "\u3000wide\u3000", "\u00a0nbsp\u2028sep\u2029",
              "\x0b\x0cvertical", "\u205fmath\u202fnarrow\u1680ogham\x85nel", "emoji 🚀 東京",
              "\x00nul"]


def twin_differences(spark, titles: list[str | None], texts: list[str]) -> dict:
    """(title, text) -> (Spark's document text, document_text) where the two, or the sha256 Spark
    computes and content_hash, differ."""
    from pyspark.sql import functions as F

    from pipeline.spark.io import document_text_column

    pairs = [(title, text) for title in titles for text in texts]
    joined = document_text_column(F.col("text"), F.col("title"))
    rows = (spark.createDataFrame(pairs, "title string, text string")
            .select("title", "text", joined.alias("document"), F.sha2(joined, 256).alias("hash"))
            .collect())
    got = {(row.title, row.text): (row.document, row.hash) for row in rows}
    assert len(got) == len(pairs)
    expected = {pair: (document_text(pair[1], pair[0]), content_hash(document_text(pair[1],
                                                                                 pair[0])))
                for pair in pairs}
    return {pair: (got[pair][0], expected[pair][0]) for pair in pairs
            if got[pair] != expected[pair]}


def test_document_text_equals_its_spark_sql_twin(spark) -> None:
    assert twin_differences(spark, TWIN_TITLES, TWIN_TEXTS) == {}


def test_a_title_of_information_separators_gives_the_same_text_in_both_twins(spark) -> None:
    assert twin_differences(spark, ["\x1c", "\x1f", " \x1d\u3000"], ["  body  ", "x"]) == {}
