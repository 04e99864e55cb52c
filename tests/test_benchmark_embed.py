"""The throughput benchmark: every mode embeds the same texts and reports comparable numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from benchmarks import embed as job
from benchmarks import harness
from tests.conftest import SAMPLE_CORPUS

MODES = ("st", "encoder", "spark_job")  # pbudf adds ~35 s; its accounting is tested below
FIELDS = ("texts", "tokens", "padded_tokens", "padding_efficiency", "seconds", "tokens_per_s",
          "texts_per_s", "peak_rss_mb", "startup_s", "vs_st", "cpu_s", "other_cores")


def test_padding_follows_each_batching():
    lengths = [10, 2, 8, 4]
    assert job.padded_tokens(lengths, [[0, 1], [2, 3]]) == 2 * 10 + 2 * 8
    texts = ["a" * 10, "b", "c" * 5, "d" * 7]
    assert job.st_batches(texts, 2) == [[0, 3], [2, 1]]


def test_predict_batch_udf_padding_comes_from_the_logged_batches():
    texts, lengths = ["a", "bb", "ccc"], [3, 5, 9]
    batches = [[job.text_digest("ccc"), job.text_digest("a")], [job.text_digest("bb")]]
    assert job.logged_batch_tokens(batches, texts, lengths) == (17, 2 * 9 + 5)


def test_short_set_is_the_first_sentence():
    assert harness.first_sentence("Paris is a city. It is large.") == "Paris is a city."
    assert harness.first_sentence("no full stop") == "no full stop"


def test_tree_rss_counts_child_processes():
    child = subprocess.Popen([sys.executable, "-c", "import time; x = b\"x\" * (200 << 20); "
                              "time.sleep(30)"])
    try:
        base = job.vm_rss_kb(os.getpid())
        for _ in range(50):
            if job.tree_rss_kb(os.getpid()) - base > 150 << 10:
                break
            time.sleep(0.1)
        assert child.pid in harness.process_tree(os.getpid())
        assert job.tree_rss_kb(os.getpid()) - base > 150 << 10
    finally:
        child.kill()
        child.wait()


@pytest.mark.slow
def test_benchmark_reports_every_mode_on_the_same_tokens(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.embed", "--corpus", str(SAMPLE_CORPUS), "--limit", "40",
         "--modes", ",".join(MODES), "--json", str(out), "--quiet-wait", "0",
         "--noise-retries", "0"],
        cwd=tmp_path, env=harness.module_env(), capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {row["mode"]: row for row in report["results"]}
    assert set(rows) == set(MODES)
    for mode, row in rows.items():
        assert all(field in row for field in FIELDS), (mode, sorted(row))
        assert row["texts"] == 40 and row["tokens_per_s"] > 0, (mode, row)
        assert 0 < row["padding_efficiency"] <= 1, (mode, row)
        assert row["peak_rss_mb"] > 0, (mode, row)
    tokens = {mode: row["tokens"] for mode, row in rows.items()}
    # The job truncates a long text at the last word start within the max length (so its
    # chunk_text re-tokenizes to what it embedded); sentence-transformers may cut inside that word.
    job_tokens = {mode: count for mode, count in tokens.items() if mode == "spark_job"}
    assert len({count for mode, count in tokens.items() if mode not in job_tokens}) == 1, tokens
    for count in job_tokens.values():
        assert 0.99 * tokens["st"] <= count <= tokens["st"], tokens
    assert rows["st"]["vs_st"] == 1.0
    assert "| spark_job |" in done.stdout
