"""The audit tables beside a vectors table: `<output>_rejects` (rows that could not be embedded,
with the reason) and `<output>_runs` (one row per run, failed runs included)."""

from __future__ import annotations

import logging

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipeline.store.delta import TableRef, with_commit_retries

log = logging.getLogger("pipeline.store")

RUNS_DDL = (
    "run_id string, started_at timestamp, ended_at timestamp, status string, mode string, "
    "plan string, chunks_written long, tokens long, seconds double, model_fingerprint string, "
    "config string, table_version long, error string"
)


def write_rejects(spark: SparkSession, table: TableRef, flagged: DataFrame, run_id: str,
                  count: int) -> None:
    """Quarantine flagged rows (pipeline.spark.io.documents) in `<output>_rejects` with the
    reason, the start of the document text (of the raw line, for a line Spark could not parse)
    and the source file; nothing when none."""
    if not count:
        return
    rejects = (flagged.where(F.col("reject_reason").isNotNull())
               .select("doc_id", F.col("reject_reason").alias("reason"),
                       F.substring(F.coalesce("raw_record", "text"), 1, 1000).alias("text_prefix"),
                       F.lit(run_id).alias("run_id"),
                       F.current_timestamp().alias("rejected_at"),
                       "source_file"))
    target = table.sibling("_rejects")
    # merge_schema: `<output>_rejects` tables from before `source_file` take the new rows
    with_commit_retries(lambda: target.write(rejects, "append", merge_schema=True),
                        "writing rejects", retries=3)
    log.warning("run %s: %d rows rejected, see %s", run_id, count, target.location)


def append_run(spark: SparkSession, table: TableRef, record: dict) -> None:
    """One row in `<output>_runs`: the run's plan, result, config and the version it wrote."""
    row = spark.createDataFrame([record], RUNS_DDL)
    with_commit_retries(lambda: table.sibling("_runs").write(row, "append"), "recording the run",
                        retries=3)


def last_succeeded_config(spark: SparkSession, table: TableRef) -> str | None:
    """The settings JSON of the last successful run recorded for `table`, if any."""
    runs = table.sibling("_runs")
    if not runs.exists(spark):
        return None
    last = (runs.read(spark).where(F.col("status") == "succeeded")
            .orderBy(F.desc("ended_at")).select("config").limit(1).collect())
    return last[0]["config"] if last else None
