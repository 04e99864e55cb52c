"""A failed or interrupted run is recorded in `<output>_runs`, with what its committed waves
wrote."""

from __future__ import annotations

import importlib
import logging
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from pipeline.errors import PipelineError
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


# The last line of a worker's traceback that names one of the pipeline's errors.
_WORKER_ERROR = re.compile(r"^(pipeline(?:\.\w+)+)\.(\w+): (.+)$", re.MULTILINE)


@contextmanager
def worker_errors() -> Iterator[None]:
    """A PipelineError raised in a Python worker (an endpoint that keeps failing, a model folder
    that differs on an executor) reaches the driver inside Spark's error, as text: raise it
    again here as itself, so the job prints its one line."""
    try:
        yield
    except PipelineError:
        raise
    except Exception as error:
        found = _WORKER_ERROR.findall(str(error))
        for module_name, class_name, message in reversed(found):
            module = sys.modules.get(module_name) or _import(module_name)
            kind = getattr(module, class_name, None) if module else None
            if isinstance(kind, type) and issubclass(kind, PipelineError):
                raise kind(message.strip()) from error
        raise


def _import(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None
