"""Incremental runs: only new and changed documents are embedded, nothing is lost or doubled."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from deltalake import DeltaTable
from pyspark.sql import functions as F

from pipeline.model.spec import ModelSpecError
from pipeline.spark.io import InputError
from pipeline.store.delta import (
    CommitConflictError,
    ModelMismatchError,
    TableRef,
    merge_documents,
    with_commit_retries,
)
from tests.conftest import REPO, delta_rows, write_jsonl
from tests.test_spark_embed import embed

SMALL_CHUNKS = ("chunking.chunk_tokens=48", "chunking.chunk_overlap=8", "spark.partitions=2")


def table_frame(path: Path) -> pd.DataFrame:
    rows = delta_rows(str(path))
    return rows.sort_values(["doc_id", "chunk_index"]).reset_index(drop=True)


def assert_same_table(got: pd.DataFrame, expected: pd.DataFrame) -> None:
    """Same keys, texts and hashes; vectors equal up to batch-composition float noise."""
    keys = ["doc_id", "chunk_index"]
    assert not got.duplicated(keys).any(), "duplicate (doc_id, chunk_index) keys"
    assert got[keys].values.tolist() == expected[keys].values.tolist()
    assert got["chunk_text"].tolist() == expected["chunk_text"].tolist()
    assert got["content_hash"].tolist() == expected["content_hash"].tolist()
    vectors = np.stack(got["embedding"].to_numpy())
    assert np.abs(vectors - np.stack(expected["embedding"].to_numpy())).max() <= 1e-5


@pytest.fixture(scope="module")
def base_docs(sample_docs) -> list[dict]:
    return [dict(d) for d in sample_docs[:30]]


@pytest.fixture(scope="module")
def base_run(spark, base_docs, tmp_path_factory):
    """The first run over `base_docs`. Tests that write to its table write to their own copy
    (`own_copy`), so none depends on another's order or changes."""
    folder = tmp_path_factory.mktemp("incremental")
    source = write_jsonl(folder / "v1.jsonl", base_docs)
    summary = embed(spark, source, folder / "vectors", *SMALL_CHUNKS)
    return folder, summary


def own_copy(base_run, destination: Path) -> Path:
    """The base run's vectors table with its runs and rejects tables, copied: a local Delta
    table's log names its files relative to its folder, so the copy is a table of its own."""
    folder, _ = base_run
    for suffix in ("", "_runs", "_rejects"):
        if (folder / f"vectors{suffix}").exists():
            shutil.copytree(folder / f"vectors{suffix}", destination / f"vectors{suffix}")
    return destination / "vectors"


def test_first_run_on_a_new_table_embeds_everything(base_run, base_docs):
    _, summary = base_run
    assert summary.mode == "incremental"
    assert (summary.documents_new, summary.documents_embedded) == (len(base_docs),
                                                                   len(base_docs))


def test_second_identical_run_embeds_nothing_and_changes_nothing(spark, base_run, base_docs,
                                                                 tmp_path):
    folder, _ = base_run
    target = own_copy(base_run, tmp_path)
    table = DeltaTable(str(target))
    version, files = table.version(), sorted(table.file_uris())
    before = table_frame(target)
    again = embed(spark, folder / "v1.jsonl", target, *SMALL_CHUNKS)
    assert (again.documents_embedded, again.chunks_written, again.tokens) == (0, 0, 0)
    assert again.documents_unchanged == before.doc_id.nunique() == len(base_docs)
    table = DeltaTable(str(target))
    assert (table.version(), sorted(table.file_uris())) == (version, files)
    pd.testing.assert_frame_equal(table_frame(target), before)


def test_changed_source_embeds_exactly_the_changes_and_equals_a_fresh_run(
        spark, base_run, base_docs, sample_docs, tmp_path):
    docs = {d["_id"]: dict(d) for d in base_docs}
    ids = sorted(docs, key=lambda i: len(docs[i]["text"]))
    grown, edited, shrunk = ids[0], ids[1], ids[-1]
    docs[grown]["text"] = " ".join([docs[grown]["text"]] * 4)
    docs[shrunk]["text"] = docs[shrunk]["text"].split(". ")[0][:80]
    docs[edited]["text"] = docs[edited]["text"] + " Edited."
    for gone in ids[2:4]:
        del docs[gone]
    for new in sample_docs[100:105]:
        docs[new["_id"]] = dict(new)
    source = write_jsonl(tmp_path / "v2.jsonl", list(docs.values()))
    target = own_copy(base_run, tmp_path / "changed")
    old = table_frame(target)

    summary = embed(spark, source, target, *SMALL_CHUNKS)

    assert (summary.documents_new, summary.documents_changed, summary.documents_deleted) == (5, 3,
                                                                                            2)
    assert summary.documents_embedded == 8
    new = table_frame(target)
    added = {d["_id"] for d in sample_docs[100:105]}
    assert set(new[new.run_id == summary.run_id].doc_id) == {grown, shrunk, edited, *added}
    last_chunk = {name: frame.groupby("doc_id").chunk_index.max() for name, frame in
                  (("old", old), ("new", new))}
    assert last_chunk["new"][grown] > last_chunk["old"][grown]
    assert last_chunk["new"][shrunk] < last_chunk["old"][shrunk]
    fresh = embed(spark, source, tmp_path / "fresh", *SMALL_CHUNKS)
    assert fresh.documents_embedded == len(docs)
    assert_same_table(new, table_frame(tmp_path / "fresh"))


def test_partial_snapshot_keeps_documents_missing_from_the_source(spark, base_run, base_docs,
                                                                  tmp_path):
    folder, _ = base_run
    target = tmp_path / "vectors"
    embed(spark, folder / "v1.jsonl", target, *SMALL_CHUNKS)
    partial = write_jsonl(tmp_path / "partial.jsonl", base_docs[:3])
    summary = embed(spark, partial, target, *SMALL_CHUNKS, "input.snapshot=partial")
    assert summary.documents_deleted == 0 and summary.documents_embedded == 0
    assert table_frame(target).doc_id.nunique() == len(base_docs)


def test_dry_run_prints_the_plan_and_writes_nothing(spark, base_run, base_docs, sample_docs,
                                                    tmp_path):
    target = own_copy(base_run, tmp_path)
    versions = [DeltaTable(str(path)).version() for path in (target, tmp_path / "vectors_runs")]
    edited = [dict(d) for d in base_docs[1:]]
    edited[0]["text"] += " Edited."
    source = write_jsonl(tmp_path / "more.jsonl", edited + sample_docs[200:203])
    plan = embed(spark, source, target, *SMALL_CHUNKS, dry_run=True)
    assert (plan.new, plan.changed, plan.unchanged, plan.deleted) == (3, 1, len(base_docs) - 2,
                                                                      1)
    assert plan.to_embed == 4
    assert [DeltaTable(str(path)).version() for path in (target, tmp_path / "vectors_runs")
            ] == versions, "neither the vectors nor the runs table is written"
    assert not (tmp_path / "vectors_rejects").exists()


def test_other_model_or_dimension_is_refused_and_overwrite_replaces(spark, base_run, tmp_path):
    folder, _ = base_run
    target = tmp_path / "vectors"
    embed(spark, folder / "v1.jsonl", target, *SMALL_CHUNKS)
    with pytest.raises(ModelMismatchError, match=r"model_fingerprint=.*--mode overwrite"):
        embed(spark, folder / "v1.jsonl", target, *SMALL_CHUNKS, "model.pooling=cls")
    with pytest.raises(ModelMismatchError, match=r"pipeline.dimension=384 \(this run: 64\)"):
        embed(spark, folder / "v1.jsonl", target, *SMALL_CHUNKS, "model.output_dim=64",
              "model.normalize=true")
    with pytest.raises(ModelMismatchError, match=r"pipeline.max_length=256 \(this run: 128\)"):
        embed(spark, folder / "v1.jsonl", target, *SMALL_CHUNKS, "model.max_length=128")
    with pytest.raises(ModelMismatchError, match=r"pipeline.chunking=window:48:8 \(this run"):
        embed(spark, folder / "v1.jsonl", target, "chunking.chunk_tokens=64",
              "chunking.chunk_overlap=8")
    spark.sql(f"ALTER TABLE delta.`{target}` SET TBLPROPERTIES ('team' = 'search', "
              "'delta.enableChangeDataFeed' = 'true')")
    before = DeltaTable(str(target)).version()
    replaced = embed(spark, folder / "v1.jsonl", target, *SMALL_CHUNKS, "model.output_dim=64",
                     mode="overwrite")
    table = DeltaTable(str(target))
    assert table.version() == before + 1, "rows and their model labels land in one commit"
    configuration = table.metadata().configuration
    assert configuration["pipeline.dimension"] == "64"
    assert configuration["team"] == "search", "the user's properties stay"
    assert configuration["delta.enableChangeDataFeed"] == "true"
    rows = table_frame(target)
    assert set(rows.model_fingerprint) == {replaced.model_fingerprint}
    assert len(rows.embedding.iloc[0]) == 64
    runs = delta_rows(str(tmp_path / "vectors_runs"))
    assert sorted(runs.status) == ["failed"] * 4 + ["succeeded"] * 2
    failed = runs[runs.status == "failed"]
    assert failed.error.str.contains("ModelMismatchError").all()
    assert json.loads(runs[runs.run_id == replaced.run_id].config.iloc[0])["output"]["mode"] == \
        "overwrite"


def test_overwrite_and_append_with_the_same_model_write_one_commit_each(spark, base_run,
                                                                       tmp_path):
    folder, _ = base_run
    target = tmp_path / "vectors"
    first = embed(spark, folder / "v1.jsonl", target, *SMALL_CHUNKS)
    replaced = embed(spark, folder / "v1.jsonl", target, *SMALL_CHUNKS, mode="overwrite")
    table = DeltaTable(str(target))
    assert replaced.table_version == table.version() == first.table_version + 1
    rows = table_frame(target)
    assert set(rows.run_id) == {replaced.run_id} and len(rows) == replaced.chunks_written
    appended = embed(spark, folder / "v1.jsonl", target, *SMALL_CHUNKS,
                     "model.query_instruction=Find paragraphs", mode="append")
    assert len(table_frame(target)) == 2 * replaced.chunks_written, "append: unsafe for reruns"
    table = DeltaTable(str(target))
    assert table.metadata().configuration["pipeline.query_instruction"].endswith(
        "Find paragraphs\nQuery:"), "a property the guard lets change is updated"
    assert table.version() == appended.table_version


def test_a_table_this_pipeline_did_not_make_is_refused(spark, base_run, tmp_path):
    folder, _ = base_run
    spark.range(3).write.format("delta").save(str(tmp_path / "theirs"))
    with pytest.raises(ModelMismatchError, match=r"records no pipeline\.model_fingerprint"):
        embed(spark, folder / "v1.jsonl", tmp_path / "theirs", *SMALL_CHUNKS)
    assert DeltaTable(str(tmp_path / "theirs")).version() == 0


def test_every_kind_of_bad_row_is_quarantined_with_its_reason(spark, tmp_path):
    rows = [
        {"_id": "ok", "title": "", "text": "Fine.", "v": 1},
        {"_id": None, "title": "", "text": "no id", "v": 1},
        {"_id": "null", "title": "", "text": None, "v": 1},
        {"_id": "empty", "title": "", "text": "", "v": 1},
        {"_id": "space", "title": "", "text": " \u3000\t", "v": 1},
        {"_id": "big", "title": "", "text": "x" * 300, "v": 1},
        {"_id": "dup", "title": "", "text": "older", "v": 1},
        {"_id": "dup", "title": "", "text": "newer", "v": 2},
        {"_id": "odd", "title": "", "text": "\ufeffBOM \x01 ctrl \ud83d\ude80 emoji", "v": 1},
        {"_id": "lone", "title": "", "text": "a lone \ud800 surrogate", "v": 1},
    ]
    source = tmp_path / "bad.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"_id": "torn", "te\n')
    with pytest.raises(InputError, match=r"duplicate document ids.*'dup' x2"):
        embed(spark, source, tmp_path / "vectors", dry_run=True)
    assert not list(tmp_path.glob("vectors*")), "a dry run writes nothing, rejects included"
    with pytest.raises(InputError, match=r"duplicate document ids.*'dup' x2"):
        embed(spark, source, tmp_path / "vectors")
    held = delta_rows(str(tmp_path / "vectors_rejects"))
    assert sorted(held[held.doc_id == "dup"].text_prefix) == ["newer", "older"]
    assert set(held[held.doc_id == "dup"].reason) == {"duplicate id (input.duplicates=fail)"}
    failed = delta_rows(str(tmp_path / "vectors_runs"))
    assert failed.status.tolist() == ["failed"] and "duplicate" in failed.error.iloc[0]
    assert not (tmp_path / "vectors").exists(), "nothing embedded"
    summary = embed(spark, source, tmp_path / "vectors", "input.duplicates=keep_last",
                    "input.order_col=v", "input.max_text_bytes=200")
    rejects = delta_rows(str(tmp_path / "vectors_rejects"))
    rejects = rejects[rejects.run_id == summary.run_id]
    reasons = sorted(zip(rejects.doc_id.fillna("<null>"), rejects.reason, strict=True))
    assert reasons == sorted([
        ("<null>", "null id"), ("<null>", "malformed record"), ("null", "null text"),
        ("empty", "empty or whitespace-only text"), ("space", "empty or whitespace-only text"),
        ("big", "text over 200 bytes"), ("dup", "duplicate id, superseded by a later v"),
    ])
    assert rejects[rejects.doc_id == "dup"].text_prefix.tolist() == ["older"]
    assert summary.rejected == 7 and summary.documents_read == 11
    landed = table_frame(tmp_path / "vectors")
    assert sorted(landed.doc_id) == ["dup", "lone", "odd", "ok"]
    odd = landed[landed.doc_id == "odd"].chunk_text.iloc[0]
    assert odd == " BOM   ctrl \U0001f680 emoji", "controls and BOM become spaces, emoji stay"
    assert landed[landed.doc_id == "lone"].chunk_text.iloc[0] == "a lone ? surrogate"
    assert landed[landed.doc_id == "dup"].chunk_text.tolist() == ["newer"]


def assert_writers_overlapped(spark, target: Path, documents: int) -> None:
    """Both runs began before either wrote a document (their start in `<target>_runs` before
    the table's first data commit), and each planned every document as new, so neither saw
    the other's rows: the two really raced for the table."""
    runs = spark.sql(f"SELECT run_id, started_at, plan FROM delta.`{target}_runs`").collect()
    assert len(runs) == 2, runs
    data_commits = [row.timestamp for row in spark.sql(f"DESCRIBE HISTORY delta.`{target}`")
                    .collect() if row.operation in ("WRITE", "MERGE")]
    assert max(run.started_at for run in runs) < min(data_commits), (runs, data_commits)
    assert [json.loads(run.plan)["new"] for run in runs] == [documents, documents], runs


def test_two_concurrent_runs_leave_one_valid_table(spark, base_run, base_docs, tmp_path):
    folder, _ = base_run
    target = tmp_path / "vectors"
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def run() -> None:
        start.wait()
        try:
            embed(spark, folder / "v1.jsonl", target, *SMALL_CHUNKS, "output.wave_docs=10")
        except BaseException as error:  # collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all("another writer" in str(e) for e in errors), errors
    assert_writers_overlapped(spark, target, len(base_docs))
    after = table_frame(target)
    assert not after.duplicated(["doc_id", "chunk_index"]).any()
    missing = len(base_docs) - after.doc_id.nunique()
    assert missing == 0 or errors, "two runs that both succeeded stored every document"
    rerun = embed(spark, folder / "v1.jsonl", target, *SMALL_CHUNKS)
    assert (rerun.documents_new, rerun.documents_changed, rerun.documents_embedded) == (
        missing, 0, missing), "a rerun embeds exactly what the writers left out"
    embed(spark, folder / "v1.jsonl", tmp_path / "clean", *SMALL_CHUNKS)
    assert_same_table(table_frame(target), table_frame(tmp_path / "clean"))


def merge_racing_a_writer(spark, table: TableRef, folder: Path, retries: int):
    """Replace one document's chunks by MERGE (with commit retries, as a wave does) while
    another writer appends a stale chunk of that document between the MERGE's read of the
    table and its commit: the MERGE's source holds each row until that append has committed.
    Returns the document id and the MERGE's outcome (None or the error it raised)."""
    rows = table.read(spark)
    doc = rows.select("doc_id").orderBy("doc_id").first()[0]
    mine = (rows.where(F.col("doc_id") == doc).withColumn("run_id", F.lit("mine"))
            .localCheckpoint())
    theirs = (mine.where(F.col("chunk_index") == 0).withColumn("chunk_index", F.lit(99))
              .withColumn("run_id", F.lit("theirs")).localCheckpoint())
    reading, committed = str(folder / "merge-reading"), str(folder / "other-committed")

    def hold(text):  # in a Python worker: files, not events, signal (no hints: a plain UDF)
        import os
        import time

        open(reading, "a").close()
        deadline = time.time() + 120
        while not os.path.exists(committed) and time.time() < deadline:
            time.sleep(0.05)
        return text

    source = mine.withColumn("chunk_text", F.udf(hold, "string")("chunk_text"))
    outcome: list[BaseException | None] = []

    def merge() -> None:
        try:
            with_commit_retries(
                lambda: merge_documents(spark, table, source, source.select("doc_id"),
                                        "mine:merge:1/1"), "wave 1/1", retries)
            outcome.append(None)
        except BaseException as error:  # asserted by the caller
            outcome.append(error)

    merging = threading.Thread(target=merge)
    merging.start()
    deadline = time.time() + 300
    while not Path(reading).exists() and merging.is_alive() and time.time() < deadline:
        time.sleep(0.05)
    assert Path(reading).exists(), outcome
    table.write(theirs, "append", tag="theirs:append:1/1")
    Path(committed).touch()
    merging.join(timeout=300)
    return doc, outcome[0]


def test_a_merge_that_loses_a_commit_race_retries_against_the_winners_rows(
        spark, base_run, tmp_path, caplog):
    table = TableRef.parse(str(own_copy(base_run, tmp_path)))
    before = table.version(spark)
    with caplog.at_level(logging.WARNING, logger="pipeline.store"):
        doc, error = merge_racing_a_writer(spark, table, tmp_path, retries=1)
    assert error is None
    assert caplog.text.count("wave 1/1 lost a commit race (Concurrent") == 1, caplog.text
    assert [(c.operation, c.user_metadata) for c in table.history(spark, before)] == [
        ("WRITE", "theirs:append:1/1"), ("MERGE", "mine:merge:1/1")], "the retry committed last"
    rows = table_frame(table.location)
    mine = rows[rows.doc_id == doc]
    assert set(mine.run_id) == {"mine"} and 99 not in set(mine.chunk_index), (
        "the retry re-read the table and removed the stale chunk the winner appended")


def test_a_merge_out_of_retries_names_another_writer_and_commits_nothing(spark, base_run,
                                                                        tmp_path):
    table = TableRef.parse(str(own_copy(base_run, tmp_path)))
    before = table.version(spark)
    _, error = merge_racing_a_writer(spark, table, tmp_path, retries=0)
    assert isinstance(error, CommitConflictError)
    assert "another writer changed the table 1 times in a row" in str(error)
    assert "run the job again" in str(error)
    assert [c.user_metadata for c in table.history(spark, before)] == ["theirs:append:1/1"]


def test_a_run_failing_at_its_checks_is_recorded_as_failed(spark, base_run, tmp_path):
    folder, _ = base_run
    with pytest.raises(InputError, match="no column"):
        embed(spark, folder / "v1.jsonl", tmp_path / "vectors", text_col="body")
    with pytest.raises(ModelSpecError, match="does not exist"):
        embed(spark, folder / "v1.jsonl", tmp_path / "vectors", model=str(tmp_path / "nope"))
    runs = delta_rows(str(tmp_path / "vectors_runs")).sort_values("started_at")
    assert runs.status.tolist() == ["failed", "failed"]
    assert runs.error.str.contains("InputError").iloc[0]
    assert runs.error.str.contains("ModelSpecError").iloc[1]
    assert runs.model_fingerprint.isna().all(), "neither got as far as the model"
    assert (runs.chunks_written == 0).all() and runs.table_version.isna().all()


def job_command(source: Path, wave_docs: int) -> list[str]:
    """The embedding job as a user starts it, in small waves of small chunks."""
    return [sys.executable, str(REPO / "jobs" / "embed_corpus.py"), "--input", str(source),
            "--set", f"output.wave_docs={wave_docs}", "--set", "chunking.chunk_tokens=96"]


def start_job(command: list[str], output: Path, log: Path, **popen) -> subprocess.Popen:
    with log.open("w") as handle:
        return subprocess.Popen([*command, "--output", str(output)], stdout=handle,
                                stderr=handle, **popen)


def wait_for_first_wave(job: subprocess.Popen, output: Path, log: Path) -> None:
    first_wave = output / "_delta_log" / "00000000000000000001.json"
    deadline = time.time() + 600
    while not first_wave.exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert first_wave.exists(), log.read_text()[-3000:]


def run_job(command: list[str], output: Path) -> dict:
    """Run the job to the end; its summary."""
    done = subprocess.run([*command, "--output", str(output)], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_terminated_run_is_recorded_as_failed_with_what_it_committed(tmp_path, sample_docs):
    source = write_jsonl(tmp_path / "docs.jsonl", sample_docs[:80])
    target = tmp_path / "vectors"
    log = tmp_path / "job.log"
    job = start_job(job_command(source, wave_docs=20), target, log)
    wait_for_first_wave(job, target, log)
    job.terminate()  # SIGTERM to the driver only, as a scheduler's timeout sends it
    assert job.wait(timeout=300) != 0
    runs = delta_rows(str(tmp_path / "vectors_runs"))
    assert runs.status.tolist() == ["failed"], log.read_text()[-3000:]
    assert "SIGTERM" in runs.error.iloc[0]
    written = DeltaTable(str(target))
    committed = delta_rows(target)
    assert runs.chunks_written.iloc[0] == len(committed) > 0
    assert runs.table_version.iloc[0] == written.version()


@pytest.mark.slow
def test_two_jobs_in_separate_processes_leave_one_valid_table(spark, tmp_path, sample_docs):
    """As two schedulers would: two spark-submits, two JVMs, one table."""
    command = job_command(write_jsonl(tmp_path / "docs.jsonl", sample_docs[:40]), wave_docs=10)
    target = tmp_path / "shared"
    logs = [tmp_path / f"job{i}.log" for i in range(2)]
    jobs = [start_job(command, target, log) for log in logs]
    codes = [job.wait(timeout=900) for job in jobs]
    for code, log in zip(codes, logs, strict=True):
        assert code == 0 or (code == 2 and "another writer" in log.read_text()), \
            log.read_text()[-3000:]
    assert_writers_overlapped(spark, target, 40)
    after = table_frame(target)
    assert not after.duplicated(["doc_id", "chunk_index"]).any()
    missing = 40 - after.doc_id.nunique()
    assert missing == 0 or any(codes), "two jobs that both succeeded stored every document"
    rerun = run_job(command, target)
    assert (rerun["documents_new"], rerun["documents_embedded"]) == (missing, missing)
    run_job(command, tmp_path / "clean")
    assert_same_table(table_frame(target), table_frame(tmp_path / "clean"))
    runs = delta_rows(str(tmp_path / "shared_runs"))
    assert sorted(runs.status) == sorted(
        ["succeeded" if code == 0 else "failed" for code in codes] + ["succeeded"]), (
        "each job's record says how it ended; the rerun succeeded")


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_table_as_a_clean_run(tmp_path, sample_docs):
    command = job_command(write_jsonl(tmp_path / "docs.jsonl", sample_docs[:80]), wave_docs=25)
    killed = tmp_path / "killed"
    log = tmp_path / "killed.log"
    job = start_job(command, killed, log, start_new_session=True)
    wait_for_first_wave(job, killed, log)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    partial = table_frame(killed)
    assert 0 < partial.doc_id.nunique() < 80, "killed between waves"

    summary = run_job(command, killed)
    assert summary["documents_unchanged"] == partial.doc_id.nunique()
    assert summary["documents_new"] == 80 - partial.doc_id.nunique()

    run_job(command, tmp_path / "clean")
    assert_same_table(table_frame(killed), table_frame(tmp_path / "clean"))
