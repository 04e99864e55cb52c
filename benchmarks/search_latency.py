"""Search latency: a one-query `spark-submit jobs/search.py` against an empty spark-submit job
(one that starts Spark and runs `spark.range(1).collect()`), the target of issue 14 (at most 2x).

    .venv/bin/python -m benchmarks.search_latency --repeat 3
    .venv/bin/python -m benchmarks.search_latency --before /tmp/before   # also an older checkout

The table is --vectors (default: the quickstart's ./data/sample_vectors, 406 vectors of the
sample corpus); where it does not exist, the quickstart's job writes it first (not timed). The
jobs run interleaved (empty, [before,] search), --repeat times, each a fresh spark-submit from
the folder that holds ./data; the table reports each kind's fastest wall time (the least
disturbed by other processes) and its ratio to the empty job's. --before is a folder holding an
older checkout's `jobs/` and `pipeline/` (`git archive <commit> | tar -x -C /tmp/before`).
Prints Markdown, writes docs/results/benchmark_search.json."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import REPO, code_version, markdown_table, write_results
from pipeline.logs import print_json_result

TARGET = 2.0
QUERY = "what is salt made of"
EMPTY = "empty spark-submit job"
EMPTY_JOB = """from pyspark.sql import SparkSession

spark = SparkSession.builder.getOrCreate()
spark.range(1).collect()
"""
COLUMNS = [("job", "job"), ("runs", "runs"), ("best_s", "wall, best of runs (s)", "{:.2f}"),
           ("seconds", "every run (s)", "{:.2f}"), ("vs_empty", "vs empty job", "{:.2f}x")]


BIN = Path(sys.executable).parent  # this environment's spark-submit, and the python it finds


def spark_submit() -> str:
    return str(BIN / "spark-submit") if (BIN / "spark-submit").exists() else "spark-submit"


def timed_run(command: list[str], cwd: Path, code: Path = REPO) -> float:
    """Wall seconds of one spark-submit, the given checkout first on PYTHONPATH."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(code), os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return seconds


def ensure_table(vectors: Path, cwd: Path) -> None:
    if (vectors / "_delta_log").is_dir():
        return
    print(f"writing {vectors} with the quickstart's job first (not timed)", file=sys.stderr)
    timed_run([spark_submit(), str(REPO / "jobs" / "embed_corpus.py"), "--output",
               str(vectors)], cwd)


def jobs(vectors: Path, empty_job: Path, before: Path | None) -> dict[str, tuple[list, Path]]:
    search = ["--vectors", str(vectors), "--query", QUERY, "--k", "3"]
    kinds = {EMPTY: ([spark_submit(), str(empty_job)], REPO)}
    if before is not None:
        kinds[f"search before ({before})"] = (
            [spark_submit(), str(before / "jobs" / "search.py"), *search], before)
    kinds["search"] = ([spark_submit(), str(REPO / "jobs" / "search.py"), *search], REPO)
    return kinds


def measure(vectors: Path, repeat: int, before: Path | None, cwd: Path) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as scratch:
        empty_job = Path(scratch) / "empty_job.py"
        empty_job.write_text(EMPTY_JOB)
        kinds = jobs(vectors, empty_job, before)
        seconds: dict[str, list[float]] = {name: [] for name in kinds}
        for _ in range(repeat):
            for name, (command, code) in kinds.items():
                seconds[name].append(timed_run(command, cwd, code))
    empty = min(seconds[EMPTY])
    return [{"job": name, "runs": len(runs), "best_s": min(runs), "seconds": runs,
             "vs_empty": min(runs) / empty} for name, runs in seconds.items()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=Path, default=Path("data/sample_vectors"),
                        help="the table searched (written by the quickstart's job if absent)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--before", type=Path, help="an older checkout to time as well")
    parser.add_argument("--json", help="the JSON record's path")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    vectors = args.vectors.resolve()
    cwd = vectors.parent.parent if vectors.parent.name == "data" else vectors.parent
    ensure_table(vectors, cwd)
    load = os.getloadavg()[0]
    rows = measure(vectors, args.repeat, args.before and args.before.resolve(), cwd)
    ratio = rows[-1]["vs_empty"]
    verdict = "met" if ratio <= TARGET else "missed"
    print(markdown_table(rows, COLUMNS, right_aligned={"runs", "best_s", "vs_empty"}))
    print(f"\none-query search at {ratio:.2f}x an empty job: target {TARGET:.0f}x {verdict} "
          f"(load average {load:.1f} at the start)")
    record = write_results("benchmark_search", {
        "code": code_version(), "vectors": str(vectors), "query": QUERY, "repeat": args.repeat,
        "target_vs_empty": TARGET, "target_met": ratio <= TARGET, "results": rows},
        args.json)
    print_json_result({"record": str(record), "search_vs_empty": round(ratio, 3),
                       "target_met": ratio <= TARGET})
    return 0


if __name__ == "__main__":
    sys.exit(main())
