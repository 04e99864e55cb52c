"""The in-process encoder against sentence-transformers `encode`, on real models."""

from __future__ import annotations

import copy
import itertools
import json
import shutil

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from pipeline.config import BatchSettings, ModelSettings
from pipeline.model.encode import Encoder
from pipeline.model.load import get_encoder
from pipeline.model.spec import resolve_model_spec

MIXED_TEXTS = [
    "Hello world",
    "A short one.",
    "Spark executors run Python workers that keep the model loaded between batches. " * 30,
    "Ünïcödé, emoji 🚀 and CJK 中文字符 in one line",
    "tab\tand\nnewlines",
    "word " * 5,
    "The quick brown fox jumps over the lazy dog. " * 12,
    "x",
]
QUERY_TASK = "Given a web search query, retrieve relevant passages that answer the query"


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


def test_minilm_matches_sentence_transformers_on_mixed_lengths(minilm_path):
    spec = resolve_model_spec(ModelSettings(name=str(minilm_path)))
    encoder = get_encoder(spec, BatchSettings(1024, 3, 0.0))
    reference = SentenceTransformer(str(minilm_path), device="cpu").encode(
        MIXED_TEXTS, batch_size=8, convert_to_numpy=True)
    ours = encoder.embed(MIXED_TEXTS)
    assert ours.shape == (len(MIXED_TEXTS), 384)
    assert max_abs_diff(ours, reference) <= 1e-5


@pytest.fixture(scope="module")
def qwen3_encoder(qwen3_path):
    spec = resolve_model_spec(ModelSettings(name=str(qwen3_path), query_instruction=QUERY_TASK))
    return get_encoder(spec, BatchSettings(2048, 4, 0.0))


def test_qwen3_hello_world_tokens_end_with_endoftext_once(qwen3_encoder):
    assert qwen3_encoder.tokenize(["Hello world"]) == [[9707, 1879, 151643]]
    long_ids = qwen3_encoder.tokenize(["word " * 2000])[0]
    assert len(long_ids) == qwen3_encoder.spec.max_length
    assert long_ids[-1] == 151643 and long_ids[-2] != 151643


def test_qwen3_batches_are_left_padded(qwen3_encoder):
    from pipeline.model.encode import pad_rows

    rows = qwen3_encoder.tokenize(["test", "test again"])
    ids, mask = pad_rows(rows, qwen3_encoder.pad_id, qwen3_encoder.spec.padding_side)
    assert ids.tolist() == [[151643, 1944, 151643], [1944, 1549, 151643]]
    assert mask.tolist() == [[0, 1, 1], [1, 1, 1]]


def test_qwen3_documents_and_queries_match_sentence_transformers(qwen3_path, qwen3_encoder):
    assert qwen3_encoder.spec.pooling == "lasttoken"
    reference = SentenceTransformer(str(qwen3_path), device="cpu")
    documents = reference.encode(MIXED_TEXTS, batch_size=8, convert_to_numpy=True)
    queries = reference.encode(MIXED_TEXTS, prompt_name="query", batch_size=8,
                               convert_to_numpy=True)
    assert max_abs_diff(qwen3_encoder.embed(MIXED_TEXTS, "document"), documents) <= 1e-5
    assert max_abs_diff(qwen3_encoder.embed(MIXED_TEXTS, "query"), queries) <= 1e-5
    assert qwen3_encoder.spec.query_prompt == f"Instruct: {QUERY_TASK}\nQuery:"


def test_matryoshka_output_dim_is_normalised_prefix_of_full_vector(minilm_path):
    full = get_encoder(resolve_model_spec(ModelSettings(name=str(minilm_path), normalize=False)),
                       BatchSettings(4096, 64, 0.0)).embed(MIXED_TEXTS)
    cut_spec = resolve_model_spec(ModelSettings(name=str(minilm_path), output_dim=64))
    cut = get_encoder(cut_spec, BatchSettings(4096, 64, 0.0)).embed(MIXED_TEXTS)
    expected = full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True)
    assert cut.shape == (len(MIXED_TEXTS), 64)
    assert np.allclose(np.linalg.norm(cut, axis=1), 1.0, atol=1e-5)
    assert max_abs_diff(cut, expected) <= 1e-5
    assert cut_spec.fingerprint != resolve_model_spec(
        ModelSettings(name=str(minilm_path))).fingerprint


class WatchedModel(torch.nn.Module):
    """The real model, recording the (rows, padded length) of every forward pass; with
    `fits_rows`, a pass over more rows raises CUDA's out-of-memory error instead, as a GPU
    would for a batch too big for it."""

    def __init__(self, model: torch.nn.Module, fits_rows: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.fits_rows = fits_rows
        self.passes: list[tuple[int, int]] = []
        self.out_of_memory: list[tuple[int, int]] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        shape = (int(input_ids.shape[0]), int(input_ids.shape[1]))
        if self.fits_rows is not None and shape[0] > self.fits_rows:
            self.out_of_memory.append(shape)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.passes.append(shape)
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


def watched_encoder(encoder: Encoder, max_batch_tokens: int, max_batch_rows: int,
                    fits_rows: int | None = None) -> tuple[Encoder, WatchedModel]:
    """A view of the same loaded model, tokenizer and spec under its own batch limits, whose
    model is watched."""
    budget = BatchSettings(max_batch_tokens, max_batch_rows, min_fill=0.0)
    view = copy.copy(get_encoder(encoder.spec, budget))
    view.model = WatchedModel(view.model, fits_rows)
    return view, view.model


BUDGET_TEXTS = [f"document number {i} " + "filler " * (i * 7 % 90) for i in range(40)]


def test_token_budget_batching_embeds_every_row_once_in_input_order(minilm_encoder):
    one_by_one = np.stack([minilm_encoder.embed([text])[0] for text in BUDGET_TEXTS])
    encoder, model = watched_encoder(minilm_encoder, max_batch_tokens=300, max_batch_rows=8)
    ids = encoder.tokenize(BUDGET_TEXTS)
    batched, padded = encoder.embed_ids(ids)
    assert max_abs_diff(batched, one_by_one) <= 1e-5
    assert sum(rows for rows, _ in model.passes) == len(ids), "every row embedded once"
    assert any(rows > 1 for rows, _ in model.passes), "rows were batched"
    assert all(rows <= 8 and rows * longest <= 300 for rows, longest in model.passes)
    assert max(rows * longest for rows, longest in model.passes) > 300 // 2, "the budget binds"
    lengths = np.array([len(row) for row in ids])
    assert (padded >= lengths).all()
    assert padded.sum() == sum(rows * longest for rows, longest in model.passes), (
        "each row is charged its batch's padded length")


def test_out_of_memory_inside_embed_ids_halves_batches_to_the_unsplit_vectors(minilm_encoder):
    unsplit_encoder, unsplit_model = watched_encoder(minilm_encoder, 4096, 16)
    ids = unsplit_encoder.tokenize(BUDGET_TEXTS)
    unsplit, unsplit_padded = unsplit_encoder.embed_ids(ids)
    assert max(rows for rows, _ in unsplit_model.passes) > 3
    encoder, model = watched_encoder(minilm_encoder, 4096, 16, fits_rows=3)
    vectors, padded = encoder.embed_ids(ids)
    assert model.out_of_memory, "batches above three rows ran out of memory"
    assert all(rows <= 3 for rows, _ in model.passes)
    assert sum(rows for rows, _ in model.passes) == len(ids), "every row embedded once"
    assert max_abs_diff(vectors, unsplit) <= 1e-5
    assert (padded == unsplit_padded).all()


def test_out_of_memory_in_the_overlapped_stream_halves_batches_to_the_unsplit_vectors(
        minilm_encoder):
    from pipeline.model.stream import Chunking, embed_stream

    slices = [(index, BUDGET_TEXTS[index:index + 10]) for index in range(0, 40, 10)]
    chunking = Chunking(window=254, overlap=16, truncate=False)
    unsplit_encoder, _ = watched_encoder(minilm_encoder, 4096, 16)
    unsplit = np.concatenate([s.vectors for s in embed_stream(unsplit_encoder, slices, chunking)])
    encoder, model = watched_encoder(minilm_encoder, 4096, 16, fits_rows=3)
    embedded = list(embed_stream(encoder, slices, chunking, overlap=True))
    assert [s.payload for s in embedded] == [0, 10, 20, 30], "slices in order"
    assert model.out_of_memory, "batches above three rows ran out of memory"
    assert all(rows <= 3 for rows, _ in model.passes)
    assert max_abs_diff(np.concatenate([s.vectors for s in embedded]), unsplit) <= 1e-5


def test_window_chunks_cover_the_text_with_configured_overlap(minilm_encoder):
    text = " ".join(f"token{i}" for i in range(700))
    chunks = minilm_encoder.chunk([text], window=100, overlap=20, truncate=False)[0]
    assert len(chunks) > 1
    for chunk in chunks:
        assert text[chunk.char_start:chunk.char_end] == chunk.text
    words = [set(chunk.text.split()) for chunk in chunks]
    assert set(text.split()) == set().union(*words), "every word lies in a chunk, none is cut"
    tokenizer = minilm_encoder.tokenizer
    assert all(len(tokenizer(c.text, add_special_tokens=False)["input_ids"]) <= 100
               for c in chunks)
    for before, after in itertools.pairwise(chunks):
        shared = text[after.char_start:before.char_end]
        assert len(tokenizer(shared, add_special_tokens=False)["input_ids"]) >= 20


def test_truncate_mode_keeps_the_prefix_that_fits(minilm_encoder):
    text = "alpha beta gamma delta " * 200
    (chunk,) = minilm_encoder.chunk([text], window=254, overlap=0, truncate=True)[0]
    assert text.startswith(chunk.text) and len(chunk.text) < len(text)
    assert len(minilm_encoder.tokenize([chunk.text])[0]) == minilm_encoder.spec.max_length


def test_a_document_prompt_leaves_room_so_every_chunk_token_is_embedded(minilm_path, tmp_path):
    folder = tmp_path / "prompted"
    shutil.copytree(minilm_path, folder)
    st_config = folder / "config_sentence_transformers.json"
    config = json.loads(st_config.read_text())
    st_config.write_text(json.dumps({**config, "prompts": {"query": "query: ",
                                                           "document": "passage: "}}))
    encoder = get_encoder(resolve_model_spec(ModelSettings(name=str(folder))),
                          BatchSettings(4096, 64, 0.0))
    text = "alpha beta gamma delta " * 200
    chunks = encoder.chunk([text], window=encoder.content_capacity, overlap=0, truncate=False)[0]
    assert len(chunks) > 1
    tokenizer = encoder.tokenizer
    for chunk in chunks:
        untruncated = tokenizer("passage: " + chunk.text)["input_ids"]
        assert len(untruncated) <= encoder.spec.max_length, "the window fits with its prompt"
        assert encoder.tokenize(["passage: " + chunk.text])[0] == untruncated


def test_same_weights_under_another_prompt_or_length_reuse_the_model_with_the_new_spec(
        minilm_path, minilm_encoder):
    from pipeline.model import load

    # other tests may have loaded others
    resident = get_encoder(minilm_encoder.spec, BatchSettings(4096, 64, 0.0))
    loads = load.load_count
    changed = resolve_model_spec(ModelSettings(name=str(minilm_path), max_length=64,
                                               query_instruction="Find it"))
    encoder = get_encoder(changed, BatchSettings(4096, 64, 0.0))
    assert encoder.spec == changed and encoder.model is resident.model
    assert load.load_count == loads
    assert max(len(row) for row in encoder.tokenize(["word " * 500])) == 64
    assert encoder.spec.prompt("query").startswith("Instruct: Find it")
