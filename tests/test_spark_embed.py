"""Embedding runs on real local Spark into real Delta tables, with the real packaged model."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import FLAG_KEYS, load_settings
from pipeline.embed import RunSummary, run_embedding
from pipeline.model.spec import ModelSpecError, resolve_model_spec
from pipeline.spark.io import InputError
from pipeline.spark.udf import embedding_udf, worker_spec
from pipeline.store.delta import ModelMismatchError, TableRef
from pipeline.text import content_hash, document_text
from tests.conftest import delta_rows, write_jsonl


def embed(spark, source: Path | str, output: Path, *overrides: str, dry_run: bool = False,
          **flags) -> RunSummary:
    keyed = {"input.path": str(source), "output.path": str(output),
             **{FLAG_KEYS.get(key, key.replace("__", ".")): value for key, value in flags.items()}}
    settings = load_settings("local", list(overrides), keyed)
    return run_embedding(spark, settings, dry_run=dry_run)


def load_records(folder: Path) -> list[dict]:
    return [json.loads(line) for path in folder.glob("*.jsonl")
            for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, sample_docs) -> Path:
    """60 sample documents, long ones included so that some are chunked."""
    docs = sorted(sample_docs, key=lambda d: len(d["text"]))
    picked = docs[::10] + docs[-5:]
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "docs.jsonl", picked)


@pytest.fixture(scope="module")
def first_run(spark, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    summary = embed(spark, corpus, out / "vectors", "spark.partitions=3",
                    f"run.load_log_dir={out / 'loads'}")
    return summary, out


def test_table_has_one_row_per_chunk_with_the_encoders_vectors(first_run, corpus,
                                                                minilm_encoder):
    summary, out = first_run
    docs = [json.loads(line) for line in corpus.read_text().splitlines()]
    rows = delta_rows(str(out / "vectors"))
    texts = {d["_id"]: document_text(d["text"], d["title"]) for d in docs}
    expected_chunks = minilm_encoder.chunk(list(texts.values()), 254, 32, truncate=False)
    assert len(rows) == sum(len(c) for c in expected_chunks) == summary.chunks_written
    assert rows["doc_id"].nunique() == len(docs) == summary.documents_embedded
    assert (rows.groupby("doc_id").chunk_index.max() > 0).any(), "long documents were chunked"
    vectors = np.stack(rows["embedding"].to_numpy()).astype(np.float32)
    assert vectors.shape[1] == 384
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    reference = minilm_encoder.embed(rows["chunk_text"].tolist())
    assert np.abs(vectors - reference).max() <= 1e-5
    for row in rows.itertuples():
        assert texts[row.doc_id][row.char_start:row.char_end] == row.chunk_text
        assert row.content_hash == content_hash(texts[row.doc_id])
    assert set(rows["run_id"]) == {summary.run_id}


def test_table_describes_its_model_in_properties(spark, first_run):
    summary, out = first_run
    properties = TableRef.parse(str(out / "vectors")).properties(spark)
    assert properties["pipeline.model_fingerprint"] == summary.model_fingerprint
    assert properties["pipeline.dimension"] == "384"
    assert properties["pipeline.pooling"] == "mean"
    assert properties["pipeline.normalize"] == "true"
    assert properties["pipeline.max_length"] == "256"


def test_summary_counts_tokens_and_padding(first_run, corpus):
    summary, _ = first_run
    documents = len(corpus.read_text().splitlines())
    assert (summary.documents_read, summary.rejected) == (documents, 0)
    assert summary.tokens > 0 and summary.padded_tokens >= summary.tokens
    assert 0.9 <= summary.padding_efficiency <= 1.0
    assert summary.table_version >= 1


def linked_copy(folder: Path, target: Path) -> Path:
    """The model folder under another path, files linked: the workers' resident model (left
    by whichever test ran before) is then not this one, so each worker must load it."""
    for path in folder.rglob("*"):
        if path.is_file():
            link = target / path.relative_to(folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path)
    return target


def test_model_loads_once_per_python_worker_across_partitions_and_jobs(spark, corpus,
                                                                       minilm_path, tmp_path):
    model = linked_copy(minilm_path, tmp_path / "model")
    for job in ("first", "second"):
        embed(spark, corpus, tmp_path / job, "spark.partitions=4", f"model.name={model}",
              "model.id=sentence-transformers/all-MiniLM-L6-v2",
              f"run.load_log_dir={tmp_path / 'loads'}")
    loads = Counter(record["pid"] for record in load_records(tmp_path / "loads"))
    assert loads, "workers recorded their loads"
    assert set(loads.values()) == {1}, f"a worker loaded the model twice: {loads}"
    assert len(loads) <= 2, "local[2] runs at most two Python workers"


def test_bad_rows_are_quarantined_and_good_rows_land(spark, tmp_path):
    source = write_jsonl(tmp_path / "bad.jsonl", [
        {"_id": "good-1", "title": "T", "text": "A fine document."},
        {"_id": None, "title": "T", "text": "no id"},
        {"_id": "null-text", "title": "T", "text": None},
        {"_id": "empty", "title": "", "text": ""},
        {"_id": "blank", "title": " ", "text": " \t\n "},
        {"_id": "title-only", "title": "A title is text too", "text": ""},
        {"_id": "control", "title": "", "text": "\ufeffBOM and \x00 NUL and emoji 🚀"},
    ])
    summary = embed(spark, source, tmp_path / "vectors")
    assert (summary.documents_read, summary.rejected, summary.documents_embedded) == (7, 4, 3)
    rejects = delta_rows(str(tmp_path / "vectors_rejects"))
    assert dict(zip(rejects["doc_id"].fillna("<null>"), rejects["reason"], strict=True)) == {
        "<null>": "null id", "null-text": "null text", "empty": "empty or whitespace-only text",
        "blank": "empty or whitespace-only text"}
    assert set(rejects["run_id"]) == {summary.run_id}
    landed = delta_rows(str(tmp_path / "vectors"))
    assert sorted(landed["doc_id"]) == ["control", "good-1", "title-only"]


@pytest.mark.parametrize("fmt", ["parquet", "csv", "delta"])
def test_parquet_csv_and_delta_inputs_with_custom_columns(spark, tmp_path, sample_docs, fmt):
    rows = [(d["_id"], d["title"], d["text"]) for d in sample_docs[:12]]
    frame = spark.createDataFrame(rows, "key string, heading string, body string")
    source = tmp_path / f"source.{fmt}"
    writer = frame.coalesce(1).write.mode("overwrite")
    if fmt == "csv":
        writer.option("header", True).option("escape", '"').csv(str(source))
    else:
        writer.format(fmt).save(str(source))
    summary = embed(spark, source, tmp_path / "vectors", id_col="key", text_col="body",
                    title_col="heading", input__format=fmt if fmt == "csv" else "auto")
    assert summary.documents_embedded == 12
    stored = delta_rows(str(tmp_path / "vectors"))
    first = stored[(stored.doc_id == rows[0][0]) & (stored.chunk_index == 0)].iloc[0]
    assert first.chunk_text.startswith(f"{rows[0][1]} {rows[0][2][:20]}")


def test_catalog_table_in_and_out(spark, sample_docs):
    rows = [(d["_id"], d["text"]) for d in sample_docs[:8]]
    spark.createDataFrame(rows, "id string, text string").write.format("delta").mode(
        "overwrite").saveAsTable("default.source_docs")
    summary = embed(spark, "table:default.source_docs", "default.doc_vectors", id_col="id",
                    title_col="", input__format="table")
    assert summary.documents_embedded == 8
    stored = spark.table("default.doc_vectors")
    assert stored.select("doc_id").distinct().count() == 8
    assert TableRef.parse("default.doc_vectors").properties(spark)["pipeline.dimension"] == "384"


def test_missing_column_is_reported_before_the_model_is_touched(spark, corpus, tmp_path):
    with pytest.raises(InputError, match=r"no column input.text_col='body'.*\['_id'"):
        embed(spark, corpus, tmp_path / "out", text_col="body", model="/no/such/model")
    assert not (tmp_path / "out").exists()


def test_missing_input_and_missing_model_are_named(spark, corpus, tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        embed(spark, tmp_path / "nope.jsonl", tmp_path / "out")
    (tmp_path / "models" / "minilm").mkdir(parents=True)
    with pytest.raises(ModelSpecError, match=r"does not exist.*models holds \['minilm'\]"):
        embed(spark, corpus, tmp_path / "out", model=str(tmp_path / "models" / "mini1m"))


def test_unreadable_input_names_the_reason(spark, tmp_path):
    garbage = tmp_path / "docs.parquet"
    garbage.write_bytes(b"this is not parquet at all" * 10)
    with pytest.raises(InputError, match=r"as parquet: .*(Parquet|magic)"):
        embed(spark, garbage, tmp_path / "out")


def test_append_with_another_model_is_refused(spark, first_run, corpus):
    _, out = first_run
    with pytest.raises(ModelMismatchError, match="--mode overwrite"):
        embed(spark, corpus, out / "vectors", "model.output_dim=64", mode="append")


def test_embedding_udf_column_matches_encoder(spark, minilm_encoder, sample_docs):
    settings = load_settings("local")
    udf = embedding_udf(worker_spec(settings, resolve_model_spec(settings.model)))
    texts = [d["text"] for d in sample_docs[:20]]
    frame = spark.createDataFrame([(t,) for t in texts], "text string").repartition(2)
    got = {r.text: np.array(r.v) for r in frame.withColumn("v", udf("text")).collect()}
    expected = minilm_encoder.embed(texts)
    assert np.abs(np.stack([got[t] for t in texts]) - expected).max() <= 1e-5
