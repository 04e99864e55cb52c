"""A failed or interrupted run is recorded in `<output>_runs`, with what its committed waves
wrote."""

from __future__ import annotations

import logging
import threading

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from pipeline.run.state import ChunkTotals, Run
from pipeline.run.summary import run_record
from pipeline.store.runs import append_run

log = logging.getLogger("pipeline.embed")


def record_failure(run: Run, error: BaseException) -> None:
    """Record the failed run. An interrupt (SIGTERM, Ctrl-C) may land in the middle of a Py4J
    call, whose connection then holds a stale answer: stop the Spark jobs still running and
    record from a fresh thread, which gets a connection of its own."""
    def record() -> None:
        if not isinstance(error, Exception):
            interrupt_spark_jobs(run.spark)
        try:
            _count_committed(run)
            append_run(run.spark, run.table, run_record(run, "failed", repr(error)))
        except Exception as record_error:  # the original error is the one to report
            log.error("run %s failed and could not be recorded: %r", run.run_id, record_error)

    recorder = threading.Thread(target=record, name=f"record-{run.run_id}")
    recorder.start()
    recorder.join()


def interrupt_spark_jobs(spark: SparkSession, tag: str | None = None) -> None:
    """Cancel the session's running Spark actions, or those of one tag (call it from a thread
    of its own after an interrupt)."""
    try:
        spark.interruptTag(tag) if tag else spark.interruptAll()
    except Exception as error:
        log.warning("could not stop running Spark jobs: %r", error)


def _count_committed(run: Run) -> None:
    """What a failed run left in the table, read from the rows that carry its run id: exact
    even when it was stopped in the middle of a commit."""
    if not run.writing or not run.table.exists(run.spark):
        return
    row = (run.table.read(run.spark).where(F.col("run_id") == run.run_id)
           .agg(F.sum(F.when(F.col("chunk_index") == 0, 1).otherwise(0)).alias("documents"),
                F.count(F.lit(1)).alias("chunks"), F.sum("token_count").alias("tokens"))
           .collect()[0])
    if row["chunks"]:
        run.written = ChunkTotals(row["documents"], row["chunks"], int(row["tokens"]))
        run.version = run.table.version(run.spark)
