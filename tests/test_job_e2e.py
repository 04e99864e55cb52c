"""The job as a user runs it: `spark-submit jobs/embed_corpus.py` in its own JVM and processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from deltalake import DeltaTable

from pipeline.text import document_text
from tests.conftest import REPO, SAMPLE_CORPUS, delta_rows

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def run_job(launcher: list[str], *args: str, cwd: Path) -> subprocess.CompletedProcess:
    # As in an activated virtual environment: spark-submit finds its Spark through `python3`.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([*launcher, str(REPO / "jobs" / "embed_corpus.py"), *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=900)


def test_spark_submit_embeds_the_sample_corpus_like_the_encoder(tmp_path, minilm_encoder):
    """With no arguments: the local profile, the shipped corpus, ./data/sample_vectors."""
    done = run_job([str(BIN / "spark-submit")], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    documents = len(SAMPLE_CORPUS.read_text().splitlines())
    assert summary["documents_read"] == summary["documents_embedded"] == documents
    assert summary["rejected"] == 0 and summary["padding_efficiency"] >= 0.9
    assert "partition" in done.stderr and "tokens/s" in done.stderr, "progress is logged"

    table = DeltaTable(str(tmp_path / "data" / "sample_vectors"))
    rows = delta_rows(tmp_path / "data" / "sample_vectors").sort_values(["doc_id", "chunk_index"])
    assert table.version() == summary["table_version"]
    docs = [json.loads(line) for line in SAMPLE_CORPUS.read_text().splitlines()]
    texts = {d["_id"]: document_text(d["text"], d["title"]) for d in docs}
    chunks = minilm_encoder.chunk(list(texts.values()), 254, 32, truncate=False)
    expected = sorted((doc_id, chunk.index, chunk.text)
                      for doc_id, doc_chunks in zip(texts, chunks, strict=True)
                      for chunk in doc_chunks)
    assert len(rows) == summary["chunks_written"] == len(expected)
    assert list(zip(rows.doc_id, rows.chunk_index, rows.chunk_text, strict=True)) == expected
    vectors = np.stack(rows["embedding"].to_numpy()).astype(np.float32)
    assert vectors.shape[1] == 384
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    reference = minilm_encoder.embed(rows["chunk_text"].tolist())
    assert np.abs(vectors - reference).max() <= 1e-5


def test_python_job_rejects_a_missing_column_naming_what_exists(tmp_path):
    done = run_job([sys.executable], "--text-col", "body", "--output", str(tmp_path / "out"),
                   cwd=tmp_path)
    assert done.returncode == 2
    assert "no column input.text_col='body'" in done.stderr and "'_id'" in done.stderr
    assert not (tmp_path / "out").exists()


def test_python_job_on_a_corpus_without_titles_needs_a_title_only_when_one_is_named(tmp_path):
    """The profile's title column is a default; `--title-col title` names one that must exist."""
    corpus = tmp_path / "notitle.jsonl"
    corpus.write_text('{"_id": "a", "text": "Only text here."}\n')
    done = run_job([sys.executable], "--input", str(corpus), "--output", str(tmp_path / "out"),
                   "--title-col", "title", cwd=tmp_path)
    assert done.returncode == 2 and "--title-col ''" in done.stderr
    done = run_job([sys.executable], "--input", str(corpus), "--output", str(tmp_path / "out"),
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "has no column 'title' (the profile's input.title_col)" in done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["documents_embedded"] == 1


def test_python_job_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    done = run_job([sys.executable], "--output", str(tmp_path / "out"), "--dry-run",
                   "--no-delete-missing", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    plan = json.loads(done.stdout.strip().splitlines()[-1])
    documents = len(SAMPLE_CORPUS.read_text().splitlines())
    assert plan["dry_run"] is True and plan["new"] == plan["documents_read"] == documents
    assert plan["delete_missing"] is False and plan["waves"] >= 1
    assert not list(tmp_path.glob("out*")), "nothing written, not even the run record"
