"""The search-latency benchmark on a table it writes: real spark-submit jobs, timed."""

from __future__ import annotations

import json

import pytest

from benchmarks import search_latency

pytestmark = pytest.mark.slow


def test_search_benchmark_times_the_search_against_an_empty_job_on_a_table_it_writes(tmp_path):
    vectors, record = tmp_path / "data" / "sample_vectors", tmp_path / "search.json"
    assert search_latency.main(["--vectors", str(vectors), "--repeat", "1",
                                "--json", str(record)]) == 0
    assert (vectors / "_delta_log").is_dir(), "the quickstart's table was written first"
    result = json.loads(record.read_text())
    rows = {row["job"]: row for row in result["results"]}
    assert list(rows) == ["empty spark-submit job", "search"]
    assert rows["empty spark-submit job"]["vs_empty"] == 1.0
    search = rows["search"]
    assert search["runs"] == 1 and search["best_s"] == search["seconds"][0] > 0
    empty = rows["empty spark-submit job"]["best_s"]
    assert search["vs_empty"] == pytest.approx(search["best_s"] / empty)
