"""Incremental writes that follow the change, not the table: blind appends for new documents,
deletion vectors instead of rewritten files, deletes in the wave's commit, compaction."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest
from pyspark.sql import functions as F

from jobs import compact_table, embed_corpus
from pipeline.store.delta import TableRef, append_documents, drop_overlapping_rows
from tests.conftest import delta_rows, write_jsonl
from tests.test_incremental import SMALL_CHUNKS, assert_same_table, table_frame
from tests.test_spark_embed import embed


def commits_after(spark, path, version: int) -> list[dict]:
    rows = (spark.sql(f"DESCRIBE HISTORY delta.`{path}`").where(F.col("version") > version)
            .orderBy("version").collect())
    return [{"operation": row["operation"], "metrics": dict(row["operationMetrics"] or {}),
             "parameters": dict(row["operationParameters"] or {})} for row in rows]


def files_with_deletion_vectors(path: Path) -> int:
    """Live files that carry a deletion vector, by replaying the table's JSON log."""
    live: dict[str, bool] = {}
    for commit in sorted((path / "_delta_log").glob("*.json")):
        actions = [json.loads(line) for line in commit.read_text().splitlines()]
        for action in actions:  # a file that gains a vector is removed and added in one commit
            if "remove" in action:
                live.pop(action["remove"]["path"], None)
        for action in actions:
            if "add" in action:
                live[action["add"]["path"]] = action["add"].get("deletionVector") is not None
    return sum(live.values())


def version_of(spark, path) -> int:
    return TableRef.parse(str(path)).version(spark)


@pytest.fixture(scope="module")
def docs(sample_docs) -> list[dict]:
    return [dict(d) for d in sample_docs[:60]]


@pytest.fixture()
def base(spark, docs, tmp_path):
    """60 documents in three waves, three partitions each: a table of several files."""
    source = write_jsonl(tmp_path / "v1.jsonl", docs)
    summary = embed(spark, source, tmp_path / "vectors", *SMALL_CHUNKS, "output.wave_docs=20")
    return tmp_path, summary


def changed_source(folder, docs):
    """Two documents changed, one deleted, one new."""
    edited = [dict(d) for d in docs[1:]]
    edited[0]["text"] += " An added sentence."
    edited[30]["text"] = "A short replacement text."
    edited.append({"_id": "brand-new", "title": "New", "text": "A document nobody has seen."})
    return write_jsonl(folder / "v2.jsonl", edited)


def test_first_run_writes_blind_appends_into_a_table_with_deletion_vectors(spark, base):
    folder, summary = base
    commits = commits_after(spark, folder / "vectors", 0)
    assert summary.waves == 3
    assert [c["operation"] for c in commits] == ["WRITE"] * 3
    assert all(c["parameters"]["mode"] == "Append" for c in commits)
    properties = TableRef.parse(str(folder / "vectors")).properties(spark)
    assert properties["delta.enableDeletionVectors"] == "true"


def test_small_change_marks_rows_and_copies_no_untouched_row(spark, base, docs, tmp_path):
    folder, _ = base
    before = version_of(spark, folder / "vectors")
    files_before = spark.sql(f"DESCRIBE DETAIL delta.`{folder / 'vectors'}`").collect()[0]
    source = changed_source(folder, docs)
    summary = embed(spark, source, folder / "vectors", *SMALL_CHUNKS, "output.wave_docs=20")
    assert (summary.documents_new, summary.documents_changed, summary.documents_deleted) == (
        1, 2, 1)
    commits = commits_after(spark, folder / "vectors", before)
    # the new document in one append; changes and the delete of the missing one in one MERGE
    assert [c["operation"] for c in commits] == ["WRITE", "MERGE"]
    merge = commits[1]["metrics"]
    assert merge["numTargetRowsCopied"] == "0"
    assert merge["numTargetFilesRemoved"] == "0"
    assert int(merge["numTargetDeletionVectorsAdded"]) >= 1
    assert int(merge["numTargetRowsDeleted"]) >= 1  # the missing document's chunks
    assert int(merge["numTargetFilesAdded"]) <= files_before["numFiles"]
    fresh = embed(spark, source, tmp_path / "fresh", *SMALL_CHUNKS)
    assert_same_table(table_frame(folder / "vectors"), table_frame(tmp_path / "fresh"))
    assert fresh.chunks_written == len(table_frame(folder / "vectors"))


def test_a_table_with_deletion_vectors_reads_the_same_in_spark_and_deltalake(spark, base, docs):
    folder, _ = base
    source = changed_source(folder, docs)
    embed(spark, source, folder / "vectors", *SMALL_CHUNKS, "output.wave_docs=20")
    by_spark = (spark.read.format("delta").load(str(folder / "vectors"))
                .select("doc_id", "chunk_index", "content_hash").toPandas())
    by_delta_rs = delta_rows(folder / "vectors")[["doc_id", "chunk_index", "content_hash"]]
    keys = ["doc_id", "chunk_index"]
    pd.testing.assert_frame_equal(by_spark.sort_values(keys).reset_index(drop=True),
                                  by_delta_rs.sort_values(keys).reset_index(drop=True))
    assert "brand-new" in set(by_spark.doc_id) and docs[0]["_id"] not in set(by_spark.doc_id)


def test_a_table_without_deletion_vectors_is_told_the_upgrade_command_and_runs_right(
        spark, base, docs, tmp_path, caplog):
    folder, _ = base
    table = TableRef.parse(str(folder / "vectors"))
    table.set_properties(spark, {"delta.enableDeletionVectors": "false"})
    source = changed_source(folder, docs)
    with caplog.at_level(logging.WARNING, logger="pipeline.embed"):
        embed(spark, source, folder / "vectors", *SMALL_CHUNKS, "output.wave_docs=20")
    command = (f"ALTER TABLE {table.sql_name} SET TBLPROPERTIES "
               "('delta.enableDeletionVectors' = 'true')")
    assert command in caplog.text
    merge = commits_after(spark, folder / "vectors", version_of(spark, folder / "vectors") - 1)
    assert int(merge[-1]["metrics"]["numTargetRowsCopied"]) > 0  # the old cost, still correct
    embed(spark, source, tmp_path / "fresh", *SMALL_CHUNKS)
    assert_same_table(table_frame(folder / "vectors"), table_frame(tmp_path / "fresh"))
    spark.sql(command)
    assert table.properties(spark)["delta.enableDeletionVectors"] == "true"


def test_documents_two_writers_appended_are_kept_once_with_the_earlier_commit(
        spark, base, docs):
    """Writer B planned before writer A's append and appended the same documents after it:
    B's overlap check finds A's commit and removes B's rows of them."""
    folder, _ = base
    table = TableRef.parse(str(folder / "vectors"))
    planned_at = 0  # B read the table when it was empty
    theirs = table.read(spark).where(F.col("doc_id").isin(docs[0]["_id"], docs[5]["_id"]))
    mine = theirs.withColumn("run_id", F.lit("writerb")).localCheckpoint()
    tag = "writerb:append:1/1"
    appended_at = append_documents(spark, table, mine, tag)
    assert drop_overlapping_rows(spark, table, mine, tag, appended_at, planned_at, {tag}) == 2
    rows = table_frame(folder / "vectors")
    assert not rows.duplicated(["doc_id", "chunk_index"]).any()
    assert "writerb" not in set(rows.run_id)
    assert rows.doc_id.nunique() == len(docs)


def test_a_document_stored_twice_is_re_embedded_once(spark, base, docs, tmp_path):
    """As a writer killed between its append and its overlap check would leave it."""
    folder, _ = base
    table = TableRef.parse(str(folder / "vectors"))
    doubled = table.read(spark).where(F.col("doc_id") == docs[3]["_id"]).localCheckpoint()
    table.write(doubled.withColumn("run_id", F.lit("killed")), "append")
    summary = embed(spark, folder / "v1.jsonl", folder / "vectors", *SMALL_CHUNKS,
                    "output.wave_docs=20")
    assert (summary.documents_changed, summary.documents_embedded) == (1, 1)
    embed(spark, folder / "v1.jsonl", tmp_path / "fresh", *SMALL_CHUNKS)
    assert_same_table(table_frame(folder / "vectors"), table_frame(tmp_path / "fresh"))


def test_a_document_stored_twice_and_missing_from_a_partial_source_is_kept_once(
        spark, base, docs):
    folder, _ = base
    table = TableRef.parse(str(folder / "vectors"))
    gone = docs[7]["_id"]
    doubled = table.read(spark).where(F.col("doc_id") == gone).localCheckpoint()
    table.write(doubled.withColumn("run_id", F.lit("killed")), "append")
    partial = write_jsonl(folder / "partial.jsonl", [d for d in docs if d["_id"] != gone])
    summary = embed(spark, partial, folder / "vectors", *SMALL_CHUNKS, "output.wave_docs=20",
                    "input.snapshot=partial")
    assert summary.documents_embedded == 0
    rows = table_frame(folder / "vectors")
    assert not rows.duplicated(["doc_id", "chunk_index"]).any()
    assert (rows.doc_id == gone).sum() == len(doubled.collect()) > 0


def test_the_embedding_job_compacts_after_its_run_when_asked(base, docs, capsys):
    folder, _ = base
    source = changed_source(folder, docs)
    assert embed_corpus.main(["--input", str(source), "--output", str(folder / "vectors"),
                              *[arg for pair in SMALL_CHUNKS for arg in ("--set", pair)],
                              "--compact"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["documents_new"] == 1
    assert files_with_deletion_vectors(folder / "vectors") == 0
    runs = delta_rows(f"{folder / 'vectors'}_runs")
    assert runs["mode"].tolist().count("compact") == 1


def test_compaction_merges_files_purges_deletion_vectors_and_is_recorded(
        spark, base, docs, capsys):
    folder, _ = base
    source = changed_source(folder, docs)
    embed(spark, source, folder / "vectors", *SMALL_CHUNKS, "output.wave_docs=20")
    before = table_frame(folder / "vectors")
    assert files_with_deletion_vectors(folder / "vectors") > 0
    assert compact_table.main(["--table", str(folder / "vectors"), "--zorder"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["files_after"] < report["files_before"]
    pd.testing.assert_frame_equal(table_frame(folder / "vectors"), before)
    assert files_with_deletion_vectors(folder / "vectors") == 0
    assert "OPTIMIZE" in [c["operation"] for c in commits_after(spark, folder / "vectors", 0)]
    files = (spark.read.format("delta").load(str(folder / "vectors"))
             .select("_metadata.file_path").distinct().count())
    assert files == report["files_after"]
    runs = delta_rows(f"{folder / 'vectors'}_runs")
    compaction = runs[runs["mode"] == "compact"]
    assert len(compaction) == 1 and compaction.table_version.iloc[0] == report["table_version"]
