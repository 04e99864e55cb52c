"""Exact distributed search against NumPy brute force, the ANN export's recall, and the search
job on a real table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pyspark import cloudpickle
from pyspark.sql import functions as F

from pipeline import search
from pipeline.ann import IDS_FILE, INDEX_FILE, MANIFEST_FILE, build_index, neighbour_recall
from pipeline.config import load_settings
from pipeline.errors import InputError, UsageError
from pipeline.search import Queries, QueryTexts, embed_queries, exact_search, query_frame
from pipeline.spark import udf
from pipeline.spark.udf import worker_spec
from pipeline.store.vectors import read_vectors
from pipeline.topk import score_batches, top_positions
from pipeline.vectors import unit_rows
from tests.conftest import REPO

CHUNKS_PER_DOC = 3


def random_units(seed: int, rows: int, dim: int) -> np.ndarray:
    return unit_rows(np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32))


def write_vectors(spark, path, matrix: np.ndarray, files: int) -> None:
    rows = len(matrix)
    frame = pd.DataFrame({
        "doc_id": [f"d{i // CHUNKS_PER_DOC:05d}" for i in range(rows)],
        "chunk_index": (np.arange(rows) % CHUNKS_PER_DOC).astype(np.int32),
        "embedding": list(matrix),
    })
    (spark.createDataFrame(frame, "doc_id string, chunk_index int, embedding array<float>")
     .repartition(files).write.format("delta").save(str(path)))


@pytest.fixture(scope="module")
def corpus(spark, tmp_path_factory):
    """30,000 unit vectors: more bytes than the driver may receive (tests/conftest.py)."""
    matrix = random_units(1, 30_000, 96)
    path = tmp_path_factory.mktemp("search") / "vectors"
    write_vectors(spark, path, matrix, files=16)
    return spark.read.format("delta").load(str(path)).repartition(16), matrix


def brute_force(matrix: np.ndarray, queries: np.ndarray, k: int, by_document: bool):
    scores = queries @ matrix.T
    doc_of = np.arange(len(matrix)) // CHUNKS_PER_DOC
    expected = []
    for row in scores:
        if by_document:
            best = {}
            for position in np.argsort(-row):
                best.setdefault(doc_of[position], position)
                if len(best) == k:
                    break
            positions = list(best.values())
        else:
            positions = list(np.argsort(-row)[:k])
        expected.append([(f"d{p // CHUNKS_PER_DOC:05d}", int(p % CHUNKS_PER_DOC), float(row[p]))
                         for p in positions])
    return expected


def ranked(results) -> dict[str, list[tuple[str, int, float]]]:
    out: dict[str, list] = {}
    for row in results.orderBy("query_id", "rank").collect():
        out.setdefault(row.query_id, []).append((row.doc_id, row.chunk_index, row.score))
    return out


@pytest.mark.parametrize("by_document", [False, True], ids=["chunks", "documents"])
def test_exact_search_equals_numpy_brute_force(spark, corpus, by_document):
    frame, matrix = corpus
    queries = random_units(2, 25, 96)
    results = exact_search(spark, frame, Queries([f"q{i}" for i in range(25)], queries), k=10,
                           by_document=by_document)
    got = ranked(results)
    for i, want in enumerate(brute_force(matrix, queries, 10, by_document)):
        hits = got[f"q{i}"]
        assert [(d, c) for d, c, _ in hits] == [(d, c) for d, c, _ in want]
        np.testing.assert_allclose([s for *_, s in hits], [s for *_, s in want], atol=1e-5)


def test_the_corpus_cannot_reach_the_driver_yet_search_runs(spark, corpus):
    frame, matrix = corpus
    assert frame.rdd.getNumPartitions() == 16
    limit = search._bytes(spark.sparkContext.getConf().get("spark.driver.maxResultSize"))
    assert matrix.nbytes > limit, "the session lets the driver receive the whole corpus"
    table = Path(frame.inputFiles()[0].removeprefix("file:")).parent
    assert not search.open_vectors(spark, str(table), on_driver=True).on_driver
    queries = Queries(["a", "b"], random_units(3, 2, 96))
    assert exact_search(spark, frame, queries, k=5).count() == 10


def test_dot_metric_keeps_vector_lengths(spark, tmp_path):
    matrix = np.array([[1, 0], [0.5, 0], [0, 3]], dtype=np.float32)
    write_vectors(spark, tmp_path / "v", matrix, files=1)
    frame = spark.read.format("delta").load(str(tmp_path / "v"))
    query = Queries(["q"], np.array([[1, 1]], dtype=np.float32))
    dot = ranked(exact_search(spark, frame, query, k=3, metric="dot"))["q"]
    cosine = ranked(exact_search(spark, frame, query, k=3, metric="cosine"))["q"]
    assert [round(s, 4) for *_, s in dot] == [3.0, 1.0, 0.5]
    assert [(d, c) for d, c, _ in cosine][:1] == [("d00000", 0)]  # ties at 0.7071: first doc
    assert [round(s, 4) for *_, s in cosine] == [0.7071, 0.7071, 0.7071]


def test_top_positions_by_document_looks_past_one_documents_many_chunks():
    scores = np.array([0.9, 0.95, 0.97, 0.99, 0.5, 0.4], dtype=np.float32)
    doc_ids = np.array(["a", "a", "a", "a", "b", "c"], dtype=object)
    chunks = np.arange(6)
    assert top_positions(scores, doc_ids, chunks, 1, by_document=False).tolist() == [3]
    assert top_positions(scores, doc_ids, chunks, 2, by_document=True).tolist() == [3, 4]
    assert top_positions(scores, doc_ids, chunks, 5, by_document=True).tolist() == [3, 4, 5]


def test_ties_are_broken_by_doc_id_whatever_the_batch_order():
    scores = np.array([0.5, 0.5, 0.5, 0.1], dtype=np.float32)
    doc_ids = np.array(["c", "b", "a", "d"], dtype=object)
    chunks = np.zeros(4, dtype=np.int32)
    for by_document in (False, True):
        assert top_positions(scores, doc_ids, chunks, 1, by_document).tolist() == [2]
        assert top_positions(scores, doc_ids, chunks, 2, by_document).tolist() == [2, 1]


def test_ann_export_recall_at_10_against_exact(spark, tmp_path):
    matrix = random_units(4, 4000, 64)
    write_vectors(spark, tmp_path / "v", matrix, files=4)
    report = build_index(spark, str(tmp_path / "v"), str(tmp_path / "index"))
    assert report.vectors == 4000 and report.dimension == 64
    assert report.recall_at_10 >= 0.95, report
    for name in (INDEX_FILE, IDS_FILE, MANIFEST_FILE):
        assert (tmp_path / "index" / name).exists()
    ids = pd.read_parquet(tmp_path / "index" / IDS_FILE)
    assert sorted(zip(ids.doc_id, ids.chunk_index, strict=True)) == sorted(
        (f"d{i // CHUNKS_PER_DOC:05d}", i % CHUNKS_PER_DOC) for i in range(4000))
    assert json.loads((tmp_path / "index" / MANIFEST_FILE).read_text())["recall_at_10"] == (
        report.recall_at_10)


def test_neighbour_recall_leaves_the_query_itself_out():
    exact = [[7, 1, 2, 3]]
    assert neighbour_recall(np.array([[7, 1, 2, 9]]), exact, np.array([7]), k=3) == 2 / 3


@pytest.mark.parametrize("by_document", [False, True], ids=["chunks", "documents"])
def test_hits_carry_their_own_chunks_text_from_the_same_scan(spark, corpus, by_document):
    frame, _ = corpus
    frame = frame.withColumn("chunk_text", F.concat_ws("#", "doc_id", "chunk_index"))
    queries = Queries([f"q{i}" for i in range(5)], random_units(5, 5, 96))
    plain = ranked(exact_search(spark, frame, queries, k=7, by_document=by_document))
    with_text = exact_search(spark, frame, queries, k=7, by_document=by_document,
                             with_text=True).collect()
    assert all(row.chunk_text == f"{row.doc_id}#{row.chunk_index}" for row in with_text)
    got: dict[str, list] = {}
    for row in sorted(with_text, key=lambda row: (row.query_id, row.rank)):
        got.setdefault(row.query_id, []).append((row.doc_id, row.chunk_index, row.score))
    assert got == plain, "the same hits with or without their text"


def test_the_executors_scoring_function_loads_without_torch(tmp_path):
    """Each executor's Python worker unpickles the scoring function, importing what it refers
    to: importing torch there would cost every worker seconds before its first vector."""
    scoring = score_batches(random_units(6, 2, 8), ["a", "b"], 3, False, True)
    pickled = tmp_path / "scoring.pickle"
    pickled.write_bytes(cloudpickle.dumps(scoring))
    check = ("import pickle, sys; pickle.loads(open(sys.argv[1], 'rb').read()); "
             "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", check, str(pickled)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_few_queries_are_embedded_on_a_local_driver_more_on_the_executors(
        spark, minilm_encoder, monkeypatch):
    worker = worker_spec(load_settings("local"), minilm_encoder.spec)
    texts = ["what is a glacier", "who wrote the iliad", "salt"]
    expected = dict(zip(["q1", "q2", "q3"], minilm_encoder.embed(texts, "query"), strict=True))

    def executors_used(*args, **kwargs):
        raise AssertionError("the executors embedded the queries")

    monkeypatch.setattr(udf, "embedding_udf", executors_used)
    here = embed_queries(query_frame(spark, texts, None), worker, 2, on_driver=True)
    assert here.ids == ["q1", "q2", "q3"]
    np.testing.assert_allclose(here.vectors, np.stack(list(expected.values())), atol=1e-5)
    monkeypatch.undo()

    def driver_used(*args, **kwargs):
        raise AssertionError("the driver embedded more than DRIVER_QUERIES queries")

    monkeypatch.setattr(search, "DRIVER_QUERIES", 2)
    monkeypatch.setattr(search, "_embed_here", driver_used)
    there = embed_queries(query_frame(spark, texts, None), worker, 2, on_driver=True)
    for query_id, vector in zip(there.ids, there.vectors, strict=True):
        np.testing.assert_allclose(vector, expected[query_id], atol=1e-5)


def test_a_missing_table_is_named(spark, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no Delta table at {tmp_path / 'nothing'}"):
        read_vectors(spark, str(tmp_path / "nothing"))


@pytest.mark.parametrize("by_document", [False, True], ids=["chunks", "documents"])
def test_a_small_table_scored_on_the_driver_equals_numpy_brute_force(spark, tmp_path,
                                                                      by_document):
    matrix = random_units(4, 3_000, 48)
    write_vectors(spark, tmp_path / "v", matrix, files=4)
    frame = spark.read.format("delta").load(str(tmp_path / "v"))
    queries = random_units(5, 12, 48)
    results = exact_search(spark, frame, Queries([f"q{i}" for i in range(12)], queries), k=8,
                           by_document=by_document, on_driver=True)
    got = ranked(results)
    for i, want in enumerate(brute_force(matrix, queries, 8, by_document)):
        hits = got[f"q{i}"]
        assert [(d, c) for d, c, _ in hits] == [(d, c) for d, c, _ in want]
        np.testing.assert_allclose([s for *_, s in hits], [s for *_, s in want], atol=1e-5)


def test_only_a_table_the_driver_may_receive_is_scored_there(spark, corpus, tmp_path,
                                                             monkeypatch):
    """The 30,000-vector corpus is over the session's maxResultSize: scored on the executors;
    a small table on the local driver, unless DRIVER_TABLE_BYTES says it is too large."""
    write_vectors(spark, tmp_path / "small", random_units(6, 300, 48), files=1)
    big = tmp_path / "big"
    write_vectors(spark, big, corpus[1], files=4)
    assert search.open_vectors(spark, str(tmp_path / "small"), on_driver=True).on_driver
    assert not search.open_vectors(spark, str(big), on_driver=True).on_driver
    monkeypatch.setattr(search, "DRIVER_TABLE_BYTES", 1000)
    assert not search.open_vectors(spark, str(tmp_path / "small"), on_driver=True).on_driver


def test_command_line_queries_keep_their_position_ids_and_blanks_are_dropped_or_refused():
    queries = QueryTexts.numbered(["glaciers", "  ", "salt"])
    assert (queries.ids, queries.texts) == (["q1", "q3"], ["glaciers", "salt"])
    with pytest.raises(UsageError, match="give queries"):
        QueryTexts.numbered([])
    with pytest.raises(InputError, match="every --query is blank"):
        QueryTexts.numbered(["", " \t"])
