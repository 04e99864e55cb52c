"""Duty-cycle benchmark: the share of a job's time a (simulated) accelerator computes.

    .venv/bin/python -m benchmarks.duty --docs 40000 --run-docs 200000

The model is benchmarks/simulated_accelerator.py: its forward pass sleeps rows x padded length /
RATE seconds, as a GPU of that speed would be busy, and frees the CPU meanwhile. Per RATE:
- in-process: the Spark task's own function (pipeline.spark.udf.chunk_and_embed) over Arrow
  batches in this process, with and without overlap: duty = busy / wall, and the non-model CPU
  seconds per million tokens (process CPU less the CPU spent launching the model: forward,
  pooling, normalising);
- the Spark job in one task (spark.partitions=1): duty in the task (busy / the embedding tasks'
  run time, from Spark's REST API) and in the run (busy / run_embedding's wall time).
Synthetic documents of 30-60 words of the sample corpus's vocabulary. Prints Markdown, writes
docs/results/benchmark_duty.json."""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from benchmarks.harness import SAMPLE_CORPUS, jsonl_rows, markdown_table, write_results
from benchmarks.simulated_accelerator import build_simulated_accelerator, forward_trace
from pipeline.config import load_settings
from pipeline.embed import run_embedding
from pipeline.logs import configure_job_logging, print_json_result
from pipeline.model.encode import Encoder
from pipeline.model.spec import resolve_model_spec
from pipeline.spark.session import get_spark
from pipeline.spark.udf import chunk_and_embed, worker_spec

ARROW_ROWS = 10_000


def synthetic_texts(documents: int, seed: int = 0) -> list[str]:
    words = sorted({word for row in jsonl_rows(SAMPLE_CORPUS) for word in row["text"].split()
                    if word.isalpha()})
    rng = random.Random(seed)
    return [" ".join(rng.choices(words, k=rng.randint(30, 60))) for _ in range(documents)]


def model_folder(work: Path, rate: float) -> tuple[Path, Path]:
    trace = work / f"trace-{int(rate)}"
    shutil.rmtree(trace, ignore_errors=True)
    trace.mkdir(parents=True)
    return build_simulated_accelerator(work / f"simulated-{int(rate)}", rate, trace), trace


def settings_for(folder: Path, overrides: list[str] | None = None, **flags: Any):
    return load_settings("local", [f"model.name={folder}", "model.trust_remote_code=true",
                                   "model.id=benchmark/simulated-accelerator",
                                   *(overrides or [])], flags or None)


def busy(trace: list[dict]) -> dict[str, float]:
    return {"busy_seconds": sum(line["end"] - line["start"] for line in trace),
            "forward_passes": len(trace)}


@contextmanager
def model_cpu_meter() -> Iterator[list[float]]:
    """CPU seconds spent in Encoder.launch (forward, pooling, normalising: work a GPU does),
    summed over threads while the block runs."""
    spent = [0.0]
    launch = Encoder.launch

    def metered(self, *args, **kwargs):
        started = time.thread_time()
        try:
            return launch(self, *args, **kwargs)
        finally:
            spent[0] += time.thread_time() - started

    Encoder.launch = metered
    try:
        yield spent
    finally:
        Encoder.launch = launch


def in_process(work: Path, rate: float, texts: list[str], overlap: bool) -> dict[str, Any]:
    folder, trace_dir = model_folder(work, rate)
    settings = settings_for(folder, [f"batch.overlap={str(overlap).lower()}"])
    run = chunk_and_embed(worker_spec(settings, resolve_model_spec(settings.model)))
    warm = pa.RecordBatch.from_pydict({"doc_id": ["w"], "text": ["warm up"],
                                       "content_hash": ["h"]})
    list(run(iter([warm])))  # loads the model: a task finds it resident
    for path in trace_dir.iterdir():
        path.unlink()
    batches = [pa.RecordBatch.from_pydict({
        "doc_id": [f"d{i}" for i in range(start, min(start + ARROW_ROWS, len(texts)))],
        "text": texts[start:start + ARROW_ROWS],
        "content_hash": ["h"] * len(texts[start:start + ARROW_ROWS])})
        for start in range(0, len(texts), ARROW_ROWS)]
    with model_cpu_meter() as model_cpu:
        cpu, wall = time.process_time(), time.perf_counter()
        tokens = sum(pc.sum(out.column("token_count")).as_py() for out in run(iter(batches)))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    model = {**busy(forward_trace(trace_dir)), "model_cpu_seconds": model_cpu[0]}
    return {"where": "in-process", "rate": rate, "overlap": overlap, "documents": len(texts),
            "tokens": tokens, "wall_seconds": round(wall, 2), **_rounded(model),
            "duty": round(model["busy_seconds"] / wall, 3),
            "non_model_cpu_per_million_tokens": round(
                (cpu - model["model_cpu_seconds"]) / tokens * 1e6, 2)}


def spark_job(spark, work: Path, rate: float, texts: list[str]) -> dict[str, Any]:
    folder, trace_dir = model_folder(work, rate)
    source = work / f"corpus-{len(texts)}"
    if not source.exists():
        source.mkdir(parents=True)
        pq.write_table(pa.table({"_id": [f"d{i:08d}" for i in range(len(texts))], "text": texts}),
                       source / "part-000.parquet")
    output = work / f"vectors-{len(texts)}-{int(rate)}"
    for leftover in (output, Path(f"{output}_runs"), Path(f"{output}_rejects")):
        shutil.rmtree(leftover, ignore_errors=True)
    settings = settings_for(folder, ["input.format=parquet", "spark.partitions=1"],
                            **{"input.path": str(source), "output.path": str(output)})
    stages_before = {stage["stageId"] for stage in _stages(spark)}
    started = time.perf_counter()
    summary = run_embedding(spark, settings)
    wall = time.perf_counter() - started
    model = busy(forward_trace(trace_dir))
    task_seconds = _embedding_task_seconds(spark, stages_before)
    return {"where": "spark, 1 task", "rate": rate, "documents": len(texts),
            "tokens": summary.tokens, "waves": summary.waves,
            "run_seconds": round(wall, 2), "task_seconds": round(task_seconds, 2),
            **_rounded(model), "duty_in_task": round(model["busy_seconds"] / task_seconds, 3),
            "duty_in_run": round(model["busy_seconds"] / wall, 3)}


def _stages(spark) -> list[dict]:
    context = spark.sparkContext
    url = f"{context.uiWebUrl}/api/v1/applications/{context.applicationId}/stages"
    with urllib.request.urlopen(url, timeout=30) as reply:
        return json.load(reply)


def _embedding_task_seconds(spark, before: set[int]) -> float:
    """Run time of the tasks that embedded: the stages of this run whose tasks ran Python."""
    stages = [stage for stage in _stages(spark) if stage["stageId"] not in before
              and stage.get("status") == "COMPLETE" and "localCheckpoint" in stage["name"]]
    return sum(stage["executorRunTime"] for stage in stages) / 1000


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {key: round(value, 2) if isinstance(value, float) else value
            for key, value in values.items()}


COLUMNS = [("where", "where"), ("rate", "RATE tokens/s"), ("overlap", "overlap"),
           ("documents", "documents"), ("tokens", "tokens"), ("busy_seconds", "busy s"),
           ("wall_seconds", "wall s"), ("task_seconds", "task s"), ("run_seconds", "run s"),
           ("duty", "duty"), ("duty_in_task", "duty in task"), ("duty_in_run", "duty in run"),
           ("non_model_cpu_per_million_tokens", "non-model CPU s / M tokens")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=40_000, help="documents per measurement")
    parser.add_argument("--run-docs", type=int, default=200_000,
                        help="documents of the whole-run measurement at the first rate (0: skip)")
    parser.add_argument("--rates", default="70000,1000000", help="tokens/s, comma list")
    parser.add_argument("--work", type=Path, default=Path("/tmp/spark-embed-duty"))
    parser.add_argument("--json", type=Path, help="default: docs/results/benchmark_duty.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    configure_job_logging()
    args = parse_args(argv)
    rates = [float(rate) for rate in args.rates.split(",")]
    texts = synthetic_texts(max(args.docs, args.run_docs))
    rows = [in_process(args.work, rate, texts[:args.docs], overlap)
            for rate in rates for overlap in (False, True)]
    spark = get_spark(settings_for(args.work).spark)
    rows += [spark_job(spark, args.work, rate, texts[:args.docs]) for rate in rates]
    if args.run_docs:
        rows.append(spark_job(spark, args.work, rates[0], texts[:args.run_docs]))
    print(markdown_table(rows, COLUMNS))
    path = write_results("benchmark_duty", {"command": " ".join(sys.argv), "results": rows},
                         args.json)
    print_json_result({"json": str(path)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
