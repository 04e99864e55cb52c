"""The downstream jobs on real tables with real models: search, similarity scoring and the BEIR
evaluation, run in-process through their `main` on the shared session."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

import pipeline.search
from benchmarks import storage as benchmark_storage
from jobs import evaluate_retrieval, score_similarity, search
from pipeline.config import BatchSettings, ModelSettings, load_settings
from pipeline.metrics import pearson, spearman
from pipeline.model.load import get_encoder
from pipeline.model.spec import resolve_model_spec
from pipeline.search import embed_queries, is_tables_model, query_frame
from pipeline.spark.udf import worker_spec
from pipeline.store.delta import TableRef
from tests.conftest import write_jsonl
from tests.test_spark_embed import embed


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def docs(sample_docs) -> list[dict]:
    return [dict(d) for d in sample_docs[:24]]


@pytest.fixture(scope="module")
def minilm_table(spark, docs, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("downstream")
    embed(spark, write_jsonl(folder / "docs.jsonl", docs), folder / "vectors",
          "spark.partitions=3")
    return folder / "vectors"


def test_search_job_finds_each_document_by_its_own_words(minilm_table, docs, tmp_path,
                                                         capsys):
    queries = [{"qid": d["_id"], "question": d["text"][:300]} for d in docs[:6]]
    source = write_jsonl(tmp_path / "queries.jsonl", queries)
    out = tmp_path / "hits.jsonl"
    code = search.main(["--vectors", str(minilm_table), "--queries", str(source),
                        "--query-id-col", "qid", "--query-text-col", "question", "--documents",
                        "--k", "3", "--output", str(out)])
    assert code == 0
    report = last_json(capsys)
    assert (report["queries"], report["rows"], report["level"]) == (6, 18, "document")
    hits = [json.loads(line) for line in out.read_text().splitlines()]
    top = {h["query_id"]: h["doc_id"] for h in hits if h["rank"] == 1}
    assert top == {q["qid"]: q["qid"] for q in queries}
    assert all(h["score"] > 0.5 for h in hits if h["rank"] == 1)


def hit_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("q")]


def test_a_small_local_table_is_searched_from_its_files_as_the_spark_scan_ranks(
        spark, minilm_table, capsys, monkeypatch):
    """On a local driver the search reads a small table's Parquet files from its log's snapshot
    (no Spark read of the table) and prints what the search through Spark prints."""
    args = ["--vectors", str(minilm_table), "--query", "glaciers", "--query", "painters",
            "--documents", "--k", "3"]
    monkeypatch.setattr(pipeline.search, "local_snapshot", lambda location: None)
    assert search.main(args) == 0
    through_spark = hit_lines(capsys)
    monkeypatch.undo()

    def spark_read(*args, **kwargs):
        raise AssertionError("read the table through Spark")

    monkeypatch.setattr(pipeline.search, "read_vectors", spark_read)
    assert search.main(args) == 0
    from_files = hit_lines(capsys)
    assert len(from_files) == 6 and from_files == through_spark


def test_blank_queries_are_dropped_from_the_command_line_and_from_a_file_alike(
        minilm_table, docs, tmp_path, capsys):
    """--query ids follow their position (a blank one is dropped, alone or beside --queries),
    and a --queries file's rows come with their own ids."""
    source = write_jsonl(tmp_path / "queries.jsonl", [{"id": "file-1", "text": docs[0]["text"]},
                                                      {"id": "file-2", "text": " \t"}])
    args = ["--vectors", str(minilm_table), "--query", " \t", "--query", "glaciers", "--k", "1"]
    for extra, asked in (([], {"q2"}), (["--queries", str(source)], {"q2", "file-1"})):
        assert search.main([*args, *extra]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert {line.split("\t")[0] for line in lines[:-1] if line.count("\t") == 4} == asked
        assert json.loads(lines[-1])["queries"] == len(asked)


def test_search_with_the_profiles_own_model_skips_the_runs_table(spark, minilm_table, capsys,
                                                                   monkeypatch):
    """The table records the profile's model (fingerprint, prompts, max length), so the search
    need not read `<table>_runs` to find it."""
    def runs_read(*args, **kwargs):
        raise AssertionError("read <table>_runs")

    monkeypatch.setattr(pipeline.search, "table_model_settings", runs_read)
    assert search.main(["--vectors", str(minilm_table), "--query", "glaciers", "--k", "2"]) == 0
    assert last_json(capsys)["rows"] == 2
    properties = TableRef.parse(str(minilm_table)).properties(spark)
    other = dataclasses.replace(load_settings("local").model, max_length=128)
    assert is_tables_model(load_settings("local").model, properties)
    assert not is_tables_model(other, properties), "another max length: read the runs"


def test_queries_are_embedded_as_the_encoder_embeds_queries(spark, minilm_encoder):
    settings = load_settings("local")
    worker = worker_spec(settings, minilm_encoder.spec)
    texts = ["what is a glacier", "who wrote the iliad"]
    embedded = embed_queries(query_frame(spark, texts, None), worker, 2)
    by_id = dict(zip(embedded.ids, embedded.vectors, strict=True))
    expected = minilm_encoder.embed(texts, "query")
    np.testing.assert_allclose(np.stack([by_id["q1"], by_id["q2"]]), expected, atol=1e-5)


def test_search_takes_the_tables_own_model_and_refuses_another(spark, docs, qwen3_path,
                                                               minilm_path, tmp_path, capsys):
    table = tmp_path / "qwen3_vectors"
    embed(spark, write_jsonl(tmp_path / "docs.jsonl", docs[:8]), table,
          f"model.name={qwen3_path}", "model.id=tiny-qwen3", "spark.partitions=2")
    assert search.main(["--vectors", str(table), "--query", "glaciers", "--k", "2",
                        "--instruction", "Find encyclopedia paragraphs"]) == 0
    report = last_json(capsys)
    assert report["model_id"] == "tiny-qwen3" and report["rows"] == 2
    assert search.main(["--vectors", str(table), "--query", "glaciers",
                        "--model", str(minilm_path)]) == 2
    assert "holds vectors" in capsys.readouterr().err


def test_search_with_the_same_model_at_another_max_length_is_allowed(spark, docs, minilm_path,
                                                                     tmp_path, capsys):
    table = tmp_path / "short_vectors"
    embed(spark, write_jsonl(tmp_path / "docs.jsonl", docs[:4]), table, "model.max_length=128",
          "spark.partitions=1")
    assert search.main(["--vectors", str(table), "--query", "glaciers", "--k", "1",
                        "--model", str(minilm_path)]) == 0, capsys.readouterr().err
    assert last_json(capsys)["rows"] == 1


def test_instruction_changes_the_query_vector_only(spark, qwen3_path):
    plain = resolve_model_spec(ModelSettings(name=str(qwen3_path)))
    instructed = resolve_model_spec(ModelSettings(name=str(qwen3_path),
                                                  query_instruction="Find paragraphs"))
    assert plain.fingerprint == instructed.fingerprint, "documents stay comparable"
    encoder = get_encoder(instructed, BatchSettings(4096, 64, 0.0))
    query = encoder.embed(["glaciers"], "query")
    document = encoder.embed(["glaciers"], "document")
    assert not np.allclose(query, document)


def test_similarity_job_scores_pairs_as_the_encoder_does(minilm_encoder, tmp_path, capsys):
    pairs = [
        {"a": "A man is playing a guitar.", "b": "Someone plays the guitar.", "gold": 4.8},
        {"a": "A cat sleeps on the sofa.", "b": "The stock market fell today.", "gold": 0.1},
        {"a": "Children play football.", "b": "Kids are playing soccer.", "gold": 4.2},
        {"a": "A woman slices onions.", "b": "A woman is cutting an onion.", "gold": 4.6},
        {"a": "   ", "b": "an empty partner", "gold": 1.0},
        {"a": "A dog runs.", "b": "A dog is running.", "gold": "n/a"},
    ]
    out = tmp_path / "scores.jsonl"
    code = score_similarity.main(["--input", str(write_jsonl(tmp_path / "pairs.jsonl", pairs)),
                                  "--text-a-col", "a", "--text-b-col", "b", "--gold-col", "gold",
                                  "--output", str(out)])
    assert code == 0
    report = last_json(capsys)
    assert (report["scored"], report["rejected"]) == (4, 2)
    assert report["rejected_by_reason"] == {"empty a": 1, "gold is not a number": 1}
    rows = {r["a"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows["   "]["score"] is None and rows["   "]["reject_reason"] == "empty a"
    a = minilm_encoder.embed([p["a"] for p in pairs[:4]])
    b = minilm_encoder.embed([p["b"] for p in pairs[:4]])
    expected = np.einsum("ij,ij->i", a, b)
    got = [rows[p["a"]]["score"] for p in pairs[:4]]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    gold = [p["gold"] for p in pairs[:4]]
    assert report["spearman"] == pytest.approx(spearman(expected, gold), abs=1e-6)
    assert report["pearson"] == pytest.approx(pearson(expected, gold), abs=1e-5)


@pytest.fixture(scope="module")
def tiny_beir(docs, tmp_path_factory) -> Path:
    """A BEIR folder from the sample corpus: each query is a sentence of its document."""
    folder = tmp_path_factory.mktemp("beir") / "tinybeir"
    (folder / "qrels").mkdir(parents=True)
    write_jsonl(folder / "corpus.jsonl", [
        {"_id": d["_id"], "title": d.get("title", ""), "text": d["text"]} for d in docs])
    asked = docs[:10]
    write_jsonl(folder / "queries.jsonl", [
        {"_id": f"q{i}", "text": d["text"].split(". ")[0]} for i, d in enumerate(asked)])
    lines = ["query-id\tcorpus-id\tscore"] + [f"q{i}\t{d['_id']}\t1" for i, d in
                                             enumerate(asked)]
    (folder / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")
    return folder


def test_evaluation_matches_plain_sentence_transformers_and_reuses_its_vectors(
        tiny_beir, tmp_path, capsys):
    args = ["--dataset", str(tiny_beir), "--vectors", str(tmp_path / "eval_vectors"),
            "--compare-sentence-transformers"]
    assert evaluate_retrieval.main(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    first = json.loads(out[-1])
    assert {"ndcg@10", "recall@100", "mrr@10", "map@100"} <= set(first)
    assert any(line.startswith("| pipeline") for line in out)
    assert first["ndcg@10"] > 0.6 and first["recall@100"] == 1.0
    assert first["report"]["max_abs_difference"] <= 0.001
    assert evaluate_retrieval.main(args[:4]) == 0
    second = last_json(capsys)
    assert second["report"]["documents_embedded"] == 0
    assert second["ndcg@10"] == first["ndcg@10"]


def test_evaluation_names_a_folder_that_is_not_beir(tmp_path, capsys):
    assert evaluate_retrieval.main(["--dataset", str(tmp_path)]) == 2
    assert "not a BEIR dataset folder" in capsys.readouterr().err


def test_storage_benchmark_reports_bytes_and_quality_per_format(spark, tiny_beir, tmp_path,
                                                                 capsys):
    vectors = tmp_path / "float32"
    embed(spark, tiny_beir / "corpus.jsonl", vectors, "chunking.mode=truncate",
          "spark.partitions=2")
    assert benchmark_storage.main([
        "--dataset", str(tiny_beir), "--vectors", str(vectors), "--dims", "384,64",
        "--work", str(tmp_path / "variants")]) == 0
    rows = {(r["format"], r["dim"]): r for r in last_json(capsys)["rows"]}
    assert len(rows) == 8
    full = rows[("float32", 384)]["vector_bytes"]
    assert full >= 384 * 4 * 0.9, "float32 hardly compresses"
    assert rows[("float16", 384)]["vector_bytes"] < 0.6 * full
    assert rows[("int8", 384)]["vector_bytes"] < 0.35 * full
    assert rows[("binary", 384)]["vector_bytes"] < 0.1 * full
    assert rows[("int8", 64)]["vector_bytes"] < rows[("int8", 384)]["vector_bytes"]
    assert abs(rows[("float16", 384)]["ndcg@10_delta"]) <= 0.01


def test_downstream_jobs_take_a_production_profile_without_input_and_output(
        qwen3_path, tmp_path, capsys):
    pairs = [{"a": "glaciers melt", "b": "ice is melting"}, {"a": "a red car", "b": "stocks"}]
    code = score_similarity.main([
        "--config", "qwen3-embedding-4b", "--model", str(qwen3_path), "--input",
        str(write_jsonl(tmp_path / "pairs.jsonl", pairs)), "--text-a-col", "a",
        "--text-b-col", "b", "--set", "batch.max_batch_tokens=4096"])
    assert code == 0, capsys.readouterr().err
    assert last_json(capsys)["scored"] == 2
    assert search.main(["--config", "qwen3-embedding-4b", "--query", "x"]) == 2
    assert "--vectors" in capsys.readouterr().err
