"""Scale benchmark: what an incremental run costs against the size of the table.

    .venv/bin/python -m benchmarks.scale --docs 100000,1000000

A near-free model (random BERT, hidden size 16, MiniLM's tokenizer) so that only the Spark and
Delta path is timed, and a synthetic corpus of 30-60 real Wikipedia words per document (the
sample corpus's vocabulary), as Parquet. Per size: the first run (each wave's embed and commit
seconds), an unchanged rerun, the plan of a changed source (a dry run), the run of that source
(1% changed, 0.1% deleted, 0.1% new: seconds, rows copied, bytes added against the bytes of the
changed chunks, files before and after), and a compaction. Prints Markdown; writes JSON."""

from __future__ import annotations

import argparse
import itertools
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.harness import SAMPLE_CORPUS, jsonl_rows, markdown_table, write_results
from benchmarks.near_free_model import build_near_free_model
from pipeline.config import load_settings
from pipeline.embed import run_embedding
from pipeline.logs import configure_job_logging, print_json_result
from pipeline.spark.session import get_spark
from pipeline.store.compact import compact, table_files
from pipeline.store.delta import TableRef


def vocabulary() -> list[str]:
    words = {word for row in jsonl_rows(SAMPLE_CORPUS) for word in row["text"].split()
             if word.isalpha()}
    return sorted(words)


def write_corpus(folder: Path, ids: list[str], texts: list[str], files: int = 8) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    step = -(-len(ids) // files)
    for part in range(files):
        chunk = slice(part * step, (part + 1) * step)
        pq.write_table(pa.table({"_id": ids[chunk], "text": texts[chunk]}),
                       folder / f"part-{part:03d}.parquet")
    return folder


def corpora(folder: Path, documents: int, seed: int = 0) -> tuple[Path, Path]:
    """The first source and the changed one: 1% changed, 0.1% deleted, 0.1% new."""
    rng = np.random.default_rng(seed)
    words = np.array(vocabulary())
    lengths = rng.integers(30, 61, documents)
    picks = rng.integers(0, len(words), int(lengths.sum()))
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    texts = [" ".join(words[picks[a:b]]) for a, b in itertools.pairwise(bounds)]
    ids = [f"d{i:08d}" for i in range(documents)]
    first = write_corpus(folder / "v1", ids, texts)
    changed_ids, changed_texts = [], []
    for i, (doc_id, text) in enumerate(zip(ids, texts, strict=True)):
        if i % 1000 == 3:
            continue  # deleted
        changed_ids.append(doc_id)
        changed_texts.append(text + " An edited closing sentence." if i % 100 == 7 else text)
    new = documents // 1000
    changed_ids += [f"n{i:08d}" for i in range(new)]
    changed_texts += [texts[i][::-1] for i in range(new)]
    return first, write_corpus(folder / "v2", changed_ids, changed_texts)


class WaveTimings(logging.Handler):
    """Collects the per-wave timing each committed wave logs."""

    def __init__(self) -> None:
        super().__init__()
        self.waves: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, "wave_timing"):
            self.waves.append(record.wave_timing)


def history_costs(spark, table: TableRef, after: int) -> dict[str, int]:
    """What the commits after `after` rewrote and added, from their operation metrics."""
    copied = added = removed = 0
    operations = []
    for commit in table.history(spark, after):
        metrics = {key: int(value) for key, value in commit.metrics.items() if value.isdigit()}
        operations.append(commit.operation)
        copied += metrics.get("numTargetRowsCopied", 0) + metrics.get("numCopiedRows", 0)
        added += (metrics.get("numTargetBytesAdded", 0) + metrics.get("numOutputBytes", 0)
                  + metrics.get("numAddedBytes", 0))
        removed += metrics.get("numTargetFilesRemoved", 0) + metrics.get("numRemovedFiles", 0)
    return {"rows_copied": copied, "bytes_added": added, "files_removed": removed,
            "commits": " + ".join(operations) or "none"}


def timed_run(spark, settings, dry_run: bool = False) -> tuple[Any, float]:
    started = time.perf_counter()
    result = run_embedding(spark, settings, dry_run=dry_run)
    return result, round(time.perf_counter() - started, 1)


def measure(spark, work: Path, documents: int, wave_docs: int, model: Path) -> dict[str, Any]:
    first_source, changed_source = corpora(work / f"corpus_{documents}", documents)
    output = work / f"vectors_{documents}"
    for leftover in (output, Path(f"{output}_runs"), Path(f"{output}_rejects")):
        shutil.rmtree(leftover, ignore_errors=True)
    table = TableRef.parse(str(output))

    def settings(source: Path):
        return load_settings("local", [
            f"model.name={model}", "model.id=benchmark/near-free-bert", "input.format=parquet",
            f"output.wave_docs={wave_docs}", "spark.partitions=2"],
            {"input.path": str(source), "output.path": str(output)})

    timings = WaveTimings()
    logging.getLogger("pipeline.embed").addHandler(timings)
    first, first_seconds = timed_run(spark, settings(first_source))
    logging.getLogger("pipeline.embed").removeHandler(timings)
    rerun, rerun_seconds = timed_run(spark, settings(first_source))
    plan, plan_seconds = timed_run(spark, settings(changed_source), dry_run=True)
    before_version = table.version(spark)
    files_before, bytes_before = table_files(spark, table)
    rows_before = first.chunks_written
    change, change_seconds = timed_run(spark, settings(changed_source))
    costs = history_costs(spark, table, before_version)
    files_after, _ = table_files(spark, table)
    changed_bytes = bytes_before / rows_before * change.chunks_written
    compaction = compact(spark, table)
    waves = timings.waves
    return {
        "documents": documents, "wave_docs": wave_docs, "chunks": rows_before,
        "first_run_seconds": first_seconds, "waves": waves,
        "second_wave_commit_seconds": waves[1]["commit_seconds"] if len(waves) > 1 else None,
        "last_wave_commit_seconds": waves[-1]["commit_seconds"],
        "unchanged_rerun_seconds": rerun_seconds, "unchanged_embedded": rerun.documents_embedded,
        "plan_seconds": plan_seconds,
        "plan": {"new": plan.new, "changed": plan.changed, "deleted": plan.deleted},
        "change_run_seconds": change_seconds, "change_chunks_written": change.chunks_written,
        **costs, "rows_copied_share": round(costs["rows_copied"] / rows_before, 4),
        "changed_chunk_bytes": int(changed_bytes),
        "bytes_added_over_changed": round(costs["bytes_added"] / changed_bytes, 2),
        "files_before_change": files_before, "files_after_change": files_after,
        "compaction_seconds": compaction.seconds, "files_after_compaction": compaction.files_after,
    }


ROWS = [("first_run_seconds", "first run s"), ("second_wave_commit_seconds", "wave 2 commit s"),
        ("last_wave_commit_seconds", "last wave commit s"),
        ("unchanged_rerun_seconds", "unchanged rerun s"), ("plan_seconds", "plan of 1% change s"),
        ("change_run_seconds", "1% change run s"), ("commits", "its commits"),
        ("rows_copied", "rows copied"), ("rows_copied_share", "rows copied / table"),
        ("bytes_added", "bytes added"), ("changed_chunk_bytes", "bytes of changed chunks"),
        ("bytes_added_over_changed", "added / changed"),
        ("files_before_change", "files before"), ("files_after_change", "files after"),
        ("compaction_seconds", "compaction s"), ("files_after_compaction", "files compacted")]


def report_table(results: list[dict]) -> str:
    """One column per corpus size, one row per figure."""
    columns = [("figure", "figure")] + [(str(r["documents"]), f"{r['documents']:,} docs")
                                        for r in results]
    rows = [{"figure": title, **{str(r["documents"]): r.get(key) for r in results}}
            for key, title in ROWS]
    return markdown_table(rows, columns)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", default="100000,1000000", help="corpus sizes, comma list")
    parser.add_argument("--waves", type=int, default=10, help="waves of the first run")
    parser.add_argument("--work", type=Path, default=Path("/tmp/spark-embed-scale"))
    parser.add_argument("--json", type=Path, help="default: docs/results/benchmark_scale.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    configure_job_logging()
    args = parse_args(argv)
    sizes = [int(size) for size in args.docs.split(",")]
    model = build_near_free_model(args.work / "near-free-bert")
    spark = get_spark(load_settings("local").spark)
    results = [measure(spark, args.work, size, max(1, size // args.waves), model)
               for size in sizes]
    print(report_table(results))
    path = write_results("benchmark_scale", {"command": " ".join(sys.argv), "results": results},
                         args.json)
    print_json_result({"json": str(path), "sizes": sizes})
    return 0


if __name__ == "__main__":
    sys.exit(main())
