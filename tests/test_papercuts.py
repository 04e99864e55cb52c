"""Issue 14's papercuts: what a run records, finds, refuses and embeds at the edges. Real Spark,
real Delta tables and the real packaged all-MiniLM-L6-v2 (or the tiny Qwen3 folder)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from jobs.embed_corpus import parse_args
from pipeline.config import FLAG_KEYS, Settings, load_settings
from pipeline.model.spec import resolve_model_spec
from pipeline.spark.io import InputError
from pipeline.spark.udf import embedding_udf, worker_spec
from pipeline.store.delta import TableRef
from tests.conftest import write_jsonl
from tests.test_spark_embed import embed

DOCS = [
    {"_id": "d1", "title": "Salt", "text": "Salt is mostly sodium chloride."},
    {"_id": "d2", "title": "Ice", "text": "Glaciers are rivers of ice."},
]


# --- 1. provenance: the recorded model id is the loaded model's -------------------------------


def test_another_model_is_recorded_under_its_own_id_not_the_profiles(spark, tmp_path,
                                                                      qwen3_path):
    source = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    summary = embed(spark, source, tmp_path / "vectors", "spark.partitions=1",
                    model=str(qwen3_path))
    assert summary.model_id == qwen3_path.name != "sentence-transformers/all-MiniLM-L6-v2"
    table = TableRef.parse(str(tmp_path / "vectors"))
    assert table.properties(spark)["pipeline.model_id"] == qwen3_path.name
    rows = spark.read.format("delta").load(table.location)
    assert {row.model_id for row in rows.select("model_id").distinct().collect()} == {
        qwen3_path.name}
    runs = spark.read.format("delta").load(str(tmp_path / "vectors_runs")).collect()
    config = json.loads(runs[0].config)
    assert (config["model"]["name"], config["model"]["id"]) == (str(qwen3_path), qwen3_path.name)


def test_the_profiles_model_id_stays_with_the_profiles_model_and_a_given_id_wins(tmp_path):
    profile_id = "sentence-transformers/all-MiniLM-L6-v2"
    profile_model = load_settings().model.name
    assert load_settings().model.id == profile_id
    assert load_settings(flags={"model.name": profile_model}).model.id == profile_id
    assert load_settings(overrides=[f"model.name={tmp_path}"]).model.id == tmp_path.name
    given = load_settings(overrides=[f"model.name={tmp_path}", "model.id=org/mine"])
    assert given.model.id == "org/mine"
    assert load_settings(flags={"model.name": "Qwen/Qwen3-Embedding-0.6B"}).model.id == (
        "Qwen/Qwen3-Embedding-0.6B")
    assert load_settings(flags={"model.name": "package:my_model"}).model.id == "my_model"
    snapshot = tmp_path / "models--Qwen--Qwen3-Embedding-4B" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    assert load_settings(flags={"model.name": str(snapshot)}).model.id == (
        "Qwen/Qwen3-Embedding-4B")
    assert load_settings("qwen3-embedding-4b", require_io=False).model.id == (
        "Qwen/Qwen3-Embedding-4B")


# --- 5. the column UDF keeps a null text null --------------------------------------------------


def test_embedding_udf_gives_a_null_text_a_null_vector(spark, minilm_encoder):
    settings = load_settings("local")
    udf = embedding_udf(worker_spec(settings, resolve_model_spec(settings.model)))
    texts = ["Salt is mostly sodium chloride.", None, "", None, "Glaciers are rivers of ice."]
    frame = spark.createDataFrame([(i, t) for i, t in enumerate(texts)], "i int, text string")
    got = {r.i: r.v for r in frame.withColumn("v", udf("text")).collect()}
    assert got[1] is None and got[3] is None
    expected = minilm_encoder.embed([texts[0], "", texts[4]])
    np.testing.assert_allclose(np.stack([got[0], got[2], got[4]]), expected, atol=1e-5)
    only_nulls = spark.createDataFrame([(None,), (None,)], "text string")
    assert [r.v for r in only_nulls.withColumn("v", udf("text")).collect()] == [None, None]


# --- 4. titles: the profile's title column is a default, one the user names must exist ---------


def test_a_profiles_title_column_the_source_lacks_is_not_used(spark, tmp_path, caplog):
    source = write_jsonl(tmp_path / "notitle.jsonl", [{"_id": "a", "text": "Only text here."}])
    assert load_settings("local").input.title_col == "title"
    with caplog.at_level(logging.INFO, logger="pipeline.spark.io"):
        summary = embed(spark, source, tmp_path / "vectors", "spark.partitions=1")
    assert summary.documents_embedded == 1
    assert "has no column 'title' (the profile's input.title_col)" in caplog.text
    rows = spark.read.format("delta").load(str(tmp_path / "vectors")).collect()
    assert [row.chunk_text for row in rows] == ["Only text here."]


@pytest.mark.parametrize("how", ["flag", "set"])
def test_a_title_column_the_user_named_must_exist(spark, tmp_path, how):
    source = write_jsonl(tmp_path / "notitle.jsonl", [{"_id": "a", "text": "Only text here."}])
    named = ({"title_col": "title"} if how == "flag" else {})
    overrides = ["input.title_col=title"] if how == "set" else []
    with pytest.raises(InputError, match=r"no column input.title_col='title'.*--title-col ''"):
        embed(spark, source, tmp_path / "vectors", *overrides, model="/no/such/model", **named)
    assert not (tmp_path / "vectors").exists()


def test_only_a_title_column_named_on_the_command_line_is_required() -> None:
    assert not load_settings("local").input.title_required
    assert not load_settings("local", ["input.text_col=body"]).input.title_required
    assert load_settings("local", flags={"input.title_col": "heading"}).input.title_required
    assert load_settings("local", ["input.title_col=heading"]).input.title_required
    assert not load_settings("qwen3-embedding-4b", require_io=False).input.title_required


# --- 3. types: non-string ids, texts and titles are refused unless cast ------------------------


@pytest.mark.parametrize(("row", "named"), [
    ({"_id": "a", "title": "T", "text": 12345}, "input.text_col='text' is bigint"),
    ({"_id": 7, "title": "T", "text": "Seven."}, "input.id_col='_id' is bigint"),
    ({"_id": "a", "title": 2.5, "text": "A text."}, "input.title_col='title' is double"),
])
def test_a_non_string_column_is_refused_before_the_model_naming_the_setting_that_casts(
        spark, tmp_path, row, named):
    source = write_jsonl(tmp_path / "typed.jsonl", [row])
    with pytest.raises(InputError, match="not string") as info:
        embed(spark, source, tmp_path / "vectors", model="/no/such/model")
    assert named in str(info.value)
    assert "set input.cast_columns=true (--cast-columns)" in str(info.value)
    assert not (tmp_path / "vectors").exists()


def test_cast_columns_embeds_bigint_ids_and_numbers_as_strings(spark, tmp_path):
    source = write_jsonl(tmp_path / "typed.jsonl", [{"_id": 7, "title": "T", "text": 12345}])
    summary = embed(spark, source, tmp_path / "vectors", "spark.partitions=1", cast_columns=True)
    assert summary.documents_embedded == 1
    rows = spark.read.format("delta").load(str(tmp_path / "vectors")).collect()
    assert [(row.doc_id, row.chunk_text) for row in rows] == [("7", "T 12345")]


def test_the_job_casts_only_with_the_cast_columns_flag() -> None:
    def settings(*argv: str) -> Settings:
        args = parse_args(list(argv))
        return load_settings(args.config, args.overrides,
                             {key: getattr(args, flag) for flag, key in FLAG_KEYS.items()})

    assert not settings().input.cast_columns
    assert settings("--cast-columns").input.cast_columns
    assert not settings("--set", "input.cast_columns=true", "--no-cast-columns").input.cast_columns


# --- 2. findable rejects: a malformed line keeps its raw text and its file ---------------------

OLD_REJECTS_DDL = "doc_id string, reason string, text_prefix string, run_id string, " \
    "rejected_at timestamp"


@pytest.fixture(scope="module")
def run_with_malformed_lines(spark, tmp_path_factory):
    """A folder of two JSONL files, one with a torn line and a line of invalid UTF-8, embedded
    next to a rejects table an older version wrote (without `source_file`)."""
    root = tmp_path_factory.mktemp("malformed")
    corpus = root / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "good.jsonl", [*DOCS, {"_id": "d3", "title": "T", "text": None}])
    (corpus / "bad.jsonl").write_bytes(
        b'{"_id": "d4", "title": "T", "text": "Fine."}\n'
        b'{"_id": "torn", "te\n'
        b'{"_id": "latin1", "title": "T", "text": "caf\xe9 au lait"}\n')
    old = spark.createDataFrame([("old", "null text", "x", "run0", None)], OLD_REJECTS_DDL)
    old.write.format("delta").save(str(root / "vectors_rejects"))
    summary = embed(spark, corpus, root / "vectors", "spark.partitions=1")
    rejects = spark.read.format("delta").load(str(root / "vectors_rejects"))
    return summary, {row.doc_id or row.text_prefix[:12]: row for row in rejects.collect()}


def test_a_malformed_line_is_quarantined_with_its_raw_text_and_file(run_with_malformed_lines):
    summary, rejects = run_with_malformed_lines
    assert summary.documents_embedded == 3 and summary.rejected == 3
    torn, latin1 = rejects['{"_id": "tor'], rejects['{"_id": "lat']
    assert (torn.reason, torn.doc_id, torn.text_prefix) == (
        "malformed record", None, '{"_id": "torn", "te')
    assert latin1.reason == "malformed record" and "caf\ufffd au lait" in latin1.text_prefix
    assert torn.source_file.endswith("/corpus/bad.jsonl") and latin1.source_file == (
        torn.source_file)
    assert rejects["d3"].reason == "null text"
    assert rejects["d3"].source_file.endswith("/corpus/good.jsonl")


def test_rejects_append_to_a_table_written_before_source_file(run_with_malformed_lines):
    summary, rejects = run_with_malformed_lines
    assert rejects["old"].run_id == "run0" and rejects["old"].source_file is None
    assert {row.run_id for key, row in rejects.items() if key != "old"} == {summary.run_id}
