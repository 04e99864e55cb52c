"""The transaction-log reader against Spark's own reading of the same Delta tables, and the local
search that reads a small table's files with it."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd
import pytest

from pipeline import search
from pipeline.search import Queries, exact_search, exact_search_files
from pipeline.store import delta_log
from pipeline.store.delta import TableRef
from pipeline.store.delta_log import local_snapshot
from tests.test_search import brute_force, random_units, ranked, write_vectors


def sql(spark, statement: str, path: Path) -> None:
    spark.sql(statement.format(table=f"delta.`{path}`"))


def spark_files(spark, path: Path) -> list[str]:
    return sorted(unquote(urlparse(f).path)
                  for f in spark.read.format("delta").load(str(path)).inputFiles())


def append_vectors(spark, path: Path, matrix: np.ndarray) -> None:
    frame = pd.DataFrame({"doc_id": [f"a{i}" for i in range(len(matrix))],
                          "chunk_index": np.zeros(len(matrix), np.int32),
                          "embedding": list(matrix)})
    (spark.createDataFrame(frame, "doc_id string, chunk_index int, embedding array<float>")
     .write.format("delta").mode("append").save(str(path)))


def assert_reads_as_spark(spark, path: Path) -> None:
    snapshot = local_snapshot(str(path))
    assert snapshot is not None, "the log reader gave up on a plain table"
    assert list(snapshot.files) == spark_files(spark, path)
    assert snapshot.size_bytes == TableRef.parse(str(path)).size_bytes(spark)
    expected = {k: v for k, v in TableRef.parse(str(path)).properties(spark).items()
                if not k.startswith(("delta.minReaderVersion", "delta.minWriterVersion",
                                     "delta.feature."))}
    assert snapshot.properties == expected


def test_appends_overwrites_and_property_changes_read_as_spark_reads_them(spark, tmp_path):
    path = tmp_path / "a folder, with space" / "t"
    write_vectors(spark, path, random_units(1, 60, 8), files=2)
    assert_reads_as_spark(spark, path)
    append_vectors(spark, path, random_units(2, 30, 8))
    sql(spark, "ALTER TABLE {table} SET TBLPROPERTIES ('pipeline.model_id' = 'm')", path)
    assert_reads_as_spark(spark, path)
    assert local_snapshot(str(path)).properties["pipeline.model_id"] == "m"
    (spark.read.format("delta").load(str(path)).limit(10).write.format("delta")
     .mode("overwrite").save(str(path)))  # every earlier file removed
    assert_reads_as_spark(spark, path)


def test_a_checkpoint_is_read_even_when_the_commits_before_it_are_gone(spark, tmp_path):
    path = tmp_path / "t"
    write_vectors(spark, path, random_units(3, 40, 8), files=2)
    sql(spark, "ALTER TABLE {table} SET TBLPROPERTIES ('delta.checkpointInterval' = '2')", path)
    for seed in range(4):
        append_vectors(spark, path, random_units(10 + seed, 10, 8))
    log = path / "_delta_log"
    checkpoints = sorted(log.glob("*.checkpoint.parquet"))
    assert checkpoints, "Delta wrote no checkpoint at interval 2"
    assert_reads_as_spark(spark, path)
    checkpoint_version = int(checkpoints[-1].name.split(".")[0])
    for commit in log.glob("*.json"):
        if int(commit.name.split(".")[0]) <= checkpoint_version:
            commit.unlink()  # as log cleanup does after the retention period
    assert local_snapshot(str(path)).version == int(max(log.glob("*.json")).name.split(".")[0])
    assert_reads_as_spark(spark, path)


def test_a_live_deletion_vector_or_a_missing_commit_sends_the_table_to_spark(spark, tmp_path):
    path = tmp_path / "t"
    write_vectors(spark, path, random_units(4, 60, 8), files=1)
    sql(spark, "ALTER TABLE {table} SET TBLPROPERTIES ('delta.enableDeletionVectors' = 'true')",
        path)
    assert_reads_as_spark(spark, path)  # the feature alone changes nothing
    sql(spark, "DELETE FROM {table} WHERE doc_id = 'd00001'", path)
    assert any('"deletionVector":{' in f.read_text() for f in (path / "_delta_log").glob("*.json"))
    assert local_snapshot(str(path)) is None
    # the purge rewrites the file: its remove names the file with its vector, which must match
    sql(spark, "REORG TABLE {table} APPLY (PURGE)", path)
    assert_reads_as_spark(spark, path)
    assert spark.read.format("delta").load(str(path)).count() == 57
    gapped = tmp_path / "gapped"
    write_vectors(spark, gapped, random_units(5, 20, 8), files=1)
    append_vectors(spark, gapped, random_units(6, 5, 8))
    append_vectors(spark, gapped, random_units(7, 5, 8))
    (gapped / "_delta_log" / f"{1:020d}.json").unlink()
    assert local_snapshot(str(gapped)) is None


def test_a_log_too_long_for_a_small_table_is_left_to_spark(spark, tmp_path, monkeypatch):
    path = tmp_path / "t"
    write_vectors(spark, path, random_units(13, 20, 8), files=1)
    assert local_snapshot(str(path)) is not None
    monkeypatch.setattr(delta_log, "LOG_BYTES_LIMIT", 100)
    assert local_snapshot(str(path)) is None


def test_partitioned_mapped_remote_and_catalog_tables_are_left_to_spark(spark, tmp_path):
    partitioned = tmp_path / "p"
    (spark.createDataFrame([("a", 0, [1.0])], "doc_id string, chunk_index int, embedding "
                           "array<float>").write.format("delta").partitionBy("doc_id")
     .save(str(partitioned)))
    assert local_snapshot(str(partitioned)) is None
    mapped = tmp_path / "m"
    write_vectors(spark, mapped, random_units(8, 10, 8), files=1)
    sql(spark, "ALTER TABLE {table} SET TBLPROPERTIES ('delta.columnMapping.mode' = 'name', "
        "'delta.minReaderVersion' = '2', 'delta.minWriterVersion' = '5')", mapped)
    assert local_snapshot(str(mapped)) is None
    assert local_snapshot("s3://bucket/vectors") is None
    assert local_snapshot("main.vectors") is None
    assert local_snapshot(str(tmp_path / "absent")) is None
    plain = tmp_path / "plain"
    write_vectors(spark, plain, random_units(14, 10, 8), files=1)
    assert local_snapshot(f"file://{plain}") == local_snapshot(str(plain)) is not None


def test_commits_a_coordinator_has_not_copied_into_the_log_send_the_table_to_spark(
        spark, tmp_path):
    path = tmp_path / "t"
    write_vectors(spark, path, random_units(15, 10, 8), files=1)
    assert local_snapshot(str(path)) is not None
    staged = path / "_delta_log" / "_staged_commits"
    staged.mkdir(exist_ok=True)
    (staged / f"{1:020d}.4b3c.json").write_text("{}\n")  # as a catalog-managed commit waits
    assert local_snapshot(str(path)) is None


@pytest.mark.parametrize("by_document", [False, True], ids=["chunks", "documents"])
def test_search_over_the_files_equals_numpy_and_the_spark_scan(spark, tmp_path, by_document):
    matrix = random_units(9, 2_000, 32)
    write_vectors(spark, tmp_path / "v", matrix, files=3)
    queries = Queries([f"q{i}" for i in range(6)], random_units(10, 6, 32))
    files = exact_search_files(spark, local_snapshot(str(tmp_path / "v")), queries, 7,
                               by_document=by_document)
    scanned = exact_search(spark, spark.read.format("delta").load(str(tmp_path / "v")), queries,
                           7, by_document=by_document)
    assert ranked(files) == ranked(scanned)
    for i, want in enumerate(brute_force(matrix, queries.vectors, 7, by_document)):
        assert [(d, c) for d, c, _ in ranked(files)[f"q{i}"]] == [(d, c) for d, c, _ in want]


def test_a_file_without_a_later_column_sends_the_search_to_spark(spark, tmp_path):
    """A column added by schema evolution is null in the older files: Spark reads that; the file
    reader declines instead of guessing."""
    path = tmp_path / "v"
    write_vectors(spark, path, random_units(11, 30, 8), files=1)
    later = pd.DataFrame({"doc_id": ["z"], "chunk_index": np.int32([0]),
                          "embedding": [random_units(12, 1, 8)[0]], "chunk_text": ["late"]})
    (spark.createDataFrame(later, "doc_id string, chunk_index int, embedding array<float>, "
                           "chunk_text string")
     .write.format("delta").mode("append").option("mergeSchema", "true").save(str(path)))
    query = Queries(["q"], random_units(12, 1, 8))
    snapshot = local_snapshot(str(path))
    assert exact_search_files(spark, snapshot, query, 3, with_text=True) is None
    assert exact_search_files(spark, snapshot, query, 3) is not None  # no text asked
    here = search.open_vectors(spark, str(path), on_driver=True)
    assert (here.snapshot, here.frame, here.on_driver) == (snapshot, None, True)
    there = search.open_vectors(spark, str(path), on_driver=False)
    assert there.snapshot is None and there.frame is not None and not there.on_driver
