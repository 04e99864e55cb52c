"""The endpoint benchmark on a small sample: a real server, the client loop, the job."""

from __future__ import annotations

import json

import pytest

from benchmarks import endpoint

pytestmark = pytest.mark.slow


def test_endpoint_benchmark_compares_the_job_with_the_client_loop_on_the_same_tokens(tmp_path):
    record = tmp_path / "endpoint.json"
    assert endpoint.main(["--docs", "120", "--concurrency", "1,2", "--request-inputs", "16",
                          "--work", str(tmp_path / "work"), "--json", str(record)]) == 0
    result = json.loads(record.read_text())
    rows = {(row["what"], row["concurrency"]): row for row in result["results"]}
    assert {what for what, _ in rows} == {"client loop", "job: embedding waves",
                                          "job: whole run"}
    assert result["saturation_concurrency"] in (1, 2)
    loops = [row for (what, _), row in rows.items() if what == "client loop"]
    assert [row["requests"] for row in loops] == [8, 8]  # 120 texts, 16 to a request
    job_rows = [row for (what, _), row in rows.items() if what != "client loop"]
    assert all(row["requests"] >= 8 and row["tokens_per_s"] > 0 for row in job_rows)
    assert max(row["of_best_loop"] for row in loops) == pytest.approx(1.0)
