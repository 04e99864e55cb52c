"""Tokenize once: every stored chunk's text, tokenized again by the model's own tokenizer, gives
exactly the ids that were embedded, and fits the max length; real Qwen3 and MiniLM tokenizers."""

from __future__ import annotations

import random

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer
from transformers import AutoTokenizer

from pipeline.config import BatchSettings, ModelSettings
from pipeline.model.load import get_encoder
from pipeline.model.spec import resolve_model_spec

PIECES = [
    "The quick brown fox jumps over the lazy dog.",
    "中文字符和日本語のテキスト、한국어 문장도 섞여 있습니다。",
    "ภาษาไทยไม่มีช่องว่างระหว่างคำในประโยคยาวๆแบบนี้",
    "النص العربي يُكتب من اليمين إلى اليسار مع التشكيل",
    "Family 👨\u200d👩\u200d👧\u200d👦 and flags 🏳\ufe0f\u200d🌈 👩🏽\u200d💻 emoji ZWJ sequences",
    "Combining marks: e\u0301 a\u0308 n\u0303 o\u0302 \u1e9b\u0323 Z\u0351\u0334a\u0335\u0315",
    "Numbers 1234567890, code `x = f(y) + 42;` and URLs https://example.org/a?b=c",
    "Tabs\tand\nnewlines\n\n  double  spaces",
]


def long_documents(count: int, seed: int) -> list[str]:
    """Documents of many chunks, each mixing scripts in random order, some without spaces."""
    rng = random.Random(seed)
    documents = []
    for _ in range(count):
        parts = [rng.choice(PIECES) for _ in range(rng.randint(8, 30))]
        joiner = rng.choice([" ", "", "\n"])
        documents.append(joiner.join(parts))
    documents.append("👨\u200d👩\u200d👧" * 200)  # one word far longer than a window
    # Few characters, many tokens: first tokenized without offsets, then again with them.
    documents.append("中文字符和日本語" * 12)
    documents.append("👨\u200d👩\u200d👧 " * 20)
    documents.append("x" * 3000)
    return documents


@pytest.fixture(scope="module", params=["qwen3", "minilm"])
def encoder_and_tokenizer(request, qwen3_path, minilm_path):
    path = qwen3_path if request.param == "qwen3" else minilm_path
    spec = resolve_model_spec(ModelSettings(name=str(path), max_length=128))
    return get_encoder(spec, BatchSettings(4096, 64, 0.0)), AutoTokenizer.from_pretrained(str(path))


def retokenized(tokenizer, text: str, lasttoken: bool) -> list[int]:
    """What sentence-transformers would feed the model for this text (Qwen3's tokenizer files
    append <|endoftext|> themselves)."""
    ids = tokenizer(text)["input_ids"]
    assert not lasttoken or ids[-1] == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return ids


@pytest.mark.parametrize("truncate", [False, True])
@pytest.mark.parametrize(("window", "overlap"), [(None, 16), (40, 8)])
def test_each_chunk_text_retokenizes_to_exactly_its_embedded_ids_within_max_length(
        encoder_and_tokenizer, window, overlap, truncate):
    encoder, tokenizer = encoder_and_tokenizer
    documents = long_documents(40, seed=len(str(window)) + truncate)
    per_doc = encoder.chunk(documents, window or encoder.content_capacity, overlap, truncate)
    lasttoken = encoder.spec.pooling == "lasttoken"
    chunks = [chunk for doc_chunks in per_doc for chunk in doc_chunks]
    assert len(chunks) > 2 * len(documents) or truncate
    for text, doc_chunks in zip(documents, per_doc, strict=True):
        for chunk in doc_chunks:
            assert chunk.text == text[chunk.char_start:chunk.char_end]
            assert retokenized(tokenizer, chunk.text, lasttoken) == chunk.ids, chunk.text
            assert len(chunk.ids) <= encoder.spec.max_length


def test_window_chunks_cover_every_content_token(encoder_and_tokenizer):
    encoder, tokenizer = encoder_and_tokenizer
    documents = long_documents(20, seed=7)
    for text, doc_chunks in zip(documents, encoder.chunk(documents, 50, 10, False), strict=True):
        n_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        covered = set().union(*(range(c.token_start, c.token_end) for c in doc_chunks))
        assert covered == set(range(n_tokens))
        assert [c.index for c in doc_chunks] == list(range(len(doc_chunks)))


def test_qwen3_chunk_vectors_equal_sentence_transformers_on_the_chunk_texts(qwen3_path):
    spec = resolve_model_spec(ModelSettings(name=str(qwen3_path), max_length=128))
    encoder = get_encoder(spec, BatchSettings(4096, 64, 0.0))
    chunks = [c for doc in encoder.chunk(long_documents(6, seed=3), encoder.content_capacity, 16,
                                         False) for c in doc]
    ours, _ = encoder.embed_ids([chunk.ids for chunk in chunks])
    reference = SentenceTransformer(str(qwen3_path), device="cpu")
    reference.max_seq_length = 128
    theirs = reference.encode([chunk.text for chunk in chunks], batch_size=16)
    assert float(np.abs(ours - theirs).max()) <= 1e-5
