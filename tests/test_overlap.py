"""Keeping the accelerator busy: the task's stages overlap and give what the serial path gives;
the next wave embeds while the previous one commits, one commit per wave, in order. The
accelerator is benchmarks/simulated_accelerator.py (a forward pass that sleeps)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pyarrow as pa
import pytest
from pyspark.sql import functions as F

from benchmarks import duty
from benchmarks.simulated_accelerator import build_simulated_accelerator, forward_trace
from pipeline.config import load_settings
from pipeline.model.spec import resolve_model_spec
from pipeline.model.stream import overlapped
from pipeline.spark.udf import chunk_and_embed, worker_spec
from tests.conftest import write_jsonl
from tests.test_spark_embed import embed


def test_overlapped_stages_keep_order_and_run_at_once():
    running, most = set(), 0
    lock = threading.Lock()

    def stage(name):
        def work(item):
            nonlocal most
            with lock:
                running.add(name)
                most = max(most, len(running))
            time.sleep(0.02)
            with lock:
                running.discard(name)
            return [*item, name]
        return work

    results = list(overlapped(([i] for i in range(20)), [stage("a"), stage("b")]))
    assert results == [[i, "a", "b"] for i in range(20)]
    assert most == 2, "the two stages never ran at the same time"


def test_an_error_in_a_stage_is_raised_to_the_caller_and_stops_the_threads():
    def fail_at_three(item):
        if item == 3:
            raise ValueError("bad item 3")
        return item

    before = threading.active_count()
    seen = []
    with pytest.raises(ValueError, match="bad item 3"):
        for item in overlapped(iter(range(10)), [fail_at_three, lambda item: item]):
            seen.append(item)
    assert seen == [0, 1, 2]
    deadline = time.time() + 5
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before


def test_closing_early_stops_the_stage_threads():
    before = threading.active_count()
    stream = overlapped(iter(range(1000)), [lambda item: item])
    assert next(stream) == 0
    stream.close()
    deadline = time.time() + 5
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before


def task_output(minilm_path, sample_docs, overlap: bool) -> pa.Table:
    settings = load_settings("local", [f"model.name={minilm_path}",
                                       f"batch.overlap={str(overlap).lower()}",
                                       "chunking.chunk_tokens=64", "batch.max_batch_tokens=2048"])
    run = chunk_and_embed(worker_spec(settings, resolve_model_spec(settings.model)))
    texts = [doc["text"] for doc in sample_docs]
    batches = [pa.RecordBatch.from_pydict({
        "doc_id": [str(i) for i in range(len(texts))][start:start + 40],
        "text": texts[start:start + 40], "content_hash": ["h"] * len(texts[start:start + 40])})
        for start in range(0, len(texts), 40)]
    return pa.Table.from_batches(list(run(iter(batches))))


def test_overlapped_task_writes_the_rows_and_vectors_of_the_serial_task(minilm_path, sample_docs):
    serial = task_output(minilm_path, sample_docs, overlap=False)
    overlapping = task_output(minilm_path, sample_docs, overlap=True)
    assert serial.num_rows > len(sample_docs), "no document was chunked"
    for column in ("doc_id", "chunk_index", "chunk_text", "char_start", "token_count"):
        assert overlapping.column(column).to_pylist() == serial.column(column).to_pylist()
    ours = np.array(overlapping.column("embedding").to_pylist())
    assert np.abs(ours - np.array(serial.column("embedding").to_pylist())).max() <= 1e-6


def test_the_next_wave_embeds_while_the_previous_one_commits(spark, tmp_path):
    trace = tmp_path / "trace"
    trace.mkdir()
    model = build_simulated_accelerator(tmp_path / "simulated", 40_000, trace)
    texts = duty.synthetic_texts(900, seed=1)
    source = write_jsonl(tmp_path / "docs.jsonl",
                         [{"_id": f"d{i}", "text": text} for i, text in enumerate(texts)])
    output = tmp_path / "vectors"
    summary = embed(spark, source, output, f"model.name={model}", "model.trust_remote_code=true",
                    "output.wave_docs=300", "spark.partitions=1")
    assert (summary.documents_embedded, summary.waves) == (900, 3)
    commits = (spark.sql(f"DESCRIBE HISTORY delta.`{output}`").where(F.col("version") > 0)
               .where(F.col("operation") == "WRITE").orderBy("version").collect())
    tags = [row["userMetadata"].split(":", 1)[1] for row in commits]
    assert tags == ["append:1/3", "append:2/3", "append:3/3"], "one commit per wave, in order"
    forwards = forward_trace(trace)
    first_wave_rows = int(commits[0]["operationMetrics"]["numOutputRows"])
    last_of_first_wave = int(np.searchsorted(np.cumsum([f["rows"] for f in forwards]),
                                             first_wave_rows))
    first_commit = commits[0]["timestamp"].timestamp()
    second_wave_early = [line for line in forwards[last_of_first_wave + 1:]
                         if line["start"] < first_commit]
    assert second_wave_early, "wave 2 waited for wave 1's commit"
    assert spark.read.format("delta").load(str(output)).count() == 900


def test_duty_benchmark_measures_in_process_duty_and_cpu(tmp_path):
    row = duty.in_process(tmp_path, 200_000, duty.synthetic_texts(300), overlap=True)
    assert row["tokens"] > 300 * 30
    assert row["forward_passes"] >= 1
    assert 0 < row["duty"] <= 1.0
    expected_busy = row["tokens"] / 200_000
    assert expected_busy * 0.95 <= row["busy_seconds"] <= expected_busy * 1.3 + 0.2
    assert row["non_model_cpu_per_million_tokens"] > 0
