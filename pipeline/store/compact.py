"""Compaction of a vectors table: many incremental runs leave many small files and deletion
vectors (rows marked replaced, still on disk). OPTIMIZE bins small files into large ones,
optionally Z-ordered by doc_id; REORG ... APPLY (PURGE) rewrites the files that carry deletion
vectors, so the replaced rows leave the storage. Each compaction is a row in `<table>_runs`."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from pyspark.sql import SparkSession

from pipeline.store.delta import TableNotFoundError, TableRef, with_commit_retries
from pipeline.store.runs import append_run


@dataclass
class CompactionReport:
    table: str
    run_id: str
    zorder_by_doc_id: bool
    purge_deletion_vectors: bool
    files_before: int
    files_after: int
    bytes_before: int
    bytes_after: int
    seconds: float
    table_version: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def table_files(spark: SparkSession, table: TableRef) -> tuple[int, int]:
    """The live files of the table and their bytes (DESCRIBE DETAIL)."""
    detail = spark.sql(f"DESCRIBE DETAIL {table.sql_name}").collect()[0]
    return int(detail["numFiles"]), int(detail["sizeInBytes"])


def compact(spark: SparkSession, table: TableRef, zorder_by_doc_id: bool = False,
            purge_deletion_vectors: bool = True, retries: int = 3) -> CompactionReport:
    """OPTIMIZE (ZORDER BY doc_id when asked), then purge deletion vectors; recorded as a run
    with mode `compact`, a failed one too. The rows read the same before and after."""
    if not table.exists(spark):
        raise TableNotFoundError(f"no Delta table at {table.location}")
    run_id, started, clock = uuid.uuid4().hex[:16], datetime.now(timezone.utc), time.perf_counter()
    options = {"zorder_by_doc_id": zorder_by_doc_id,
               "purge_deletion_vectors": purge_deletion_vectors}

    def record(status: str, report: CompactionReport | None, error: str | None) -> None:
        append_run(spark, table, {
            "run_id": run_id, "started_at": started, "ended_at": datetime.now(timezone.utc),
            "status": status, "mode": "compact", "plan": report.to_json() if report else None,
            "chunks_written": 0, "tokens": 0, "seconds": round(time.perf_counter() - clock, 2),
            "model_fingerprint": table.properties(spark).get("pipeline.model_fingerprint"),
            "config": json.dumps(options), "table_version": table.version(spark),
            "error": error})

    try:
        files_before, bytes_before = table_files(spark, table)
        zorder = " ZORDER BY (doc_id)" if zorder_by_doc_id else ""
        with_commit_retries(lambda: spark.sql(f"OPTIMIZE {table.sql_name}{zorder}").collect(),
                            f"compacting {table.location}", retries)
        if purge_deletion_vectors:
            with_commit_retries(
                lambda: spark.sql(f"REORG TABLE {table.sql_name} APPLY (PURGE)").collect(),
                f"purging deletion vectors of {table.location}", retries)
        files_after, bytes_after = table_files(spark, table)
    except Exception as error:
        record("failed", None, repr(error))
        raise
    report = CompactionReport(
        table=table.location, run_id=run_id, **options, files_before=files_before,
        files_after=files_after, bytes_before=bytes_before, bytes_after=bytes_after,
        seconds=round(time.perf_counter() - clock, 2), table_version=table.version(spark))
    record("succeeded", report, None)
    return report
