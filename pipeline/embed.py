"""One embedding run: read -> quarantine -> plan -> embed in waves -> write -> summary.

Incremental runs compare each source document's content hash with the table and embed only new
and changed documents, committing one wave of documents at a time through a Delta MERGE keyed by
(doc_id, chunk_index). A run killed at any moment leaves only whole waves behind, and the same
command run again plans what is still missing, so it finishes the work without duplicates."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipeline.config import Settings
from pipeline.model.spec import resolve_model_spec
from pipeline.run.failures import interrupt_spark_jobs, record_failure
from pipeline.run.plan import (
    check_inputs,
    dry_run_plan,
    keep_doubled_documents_once,
    make_plan,
    table_properties,
)
from pipeline.run.state import Run, RunPlan, RunSummary
from pipeline.run.summary import run_record, summarize
from pipeline.run.waves import (
    embed_in_waves,
    released,
    warming_workers,
    write_in_one_commit,
)
from pipeline.schema import VECTOR_DDL
from pipeline.spark.io import read_source
from pipeline.store.delta import (
    TableRef,
    appends_blindly,
    label_missing_properties,
    prepare_table,
    upgrade_advice,
)
from pipeline.store.runs import append_run, write_rejects

log = logging.getLogger("pipeline.embed")

__all__ = ["RunPlan", "RunSummary", "interrupt_spark_jobs", "run_embedding"]


def run_embedding(spark: SparkSession, settings: Settings, *, dry_run: bool = False
                  ) -> RunSummary | RunPlan:
    """Everything is checked (source, columns, model folder, duplicate ids, model guard) before
    any embedding. Every run is recorded in `<output>_runs`; a failed one too, whether it fails
    at a check, halfway (with what its committed waves wrote) or is interrupted."""
    run = Run(spark, settings, TableRef.parse(settings.output.path))
    if dry_run:
        return dry_run_plan(run, _checked_inputs(run, dry_run=True))
    try:
        with released(_checked_inputs(run)) as flagged:
            summary = _run(run, flagged)
    except BaseException as error:
        record_failure(run, error)
        raise
    append_run(spark, run.table, run_record(run, "succeeded", None))
    return summary


def _checked_inputs(run: Run, dry_run: bool = False) -> DataFrame:
    """The source (its columns checked), then the model folder (its spec kept in the run, which
    every later step reads), then the source's rows flagged: all before any model loads. An
    endpoint is probed first, before Spark reads anything."""
    if run.settings.model.backend != "local":
        run.spec = resolve_model_spec(run.settings.model)
    source = read_source(run.spark, run.settings.input)
    run.spec = run.spec or resolve_model_spec(run.settings.model)
    return check_inputs(run, source, dry_run)


def _run(run: Run, flagged: DataFrame) -> RunSummary:
    mode = run.settings.output.mode
    properties = table_properties(run)
    existed = prepare_table(run.spark, run.table, VECTOR_DDL, mode, properties)
    incremental = mode == "incremental"
    if incremental:
        stored = run.table.properties(run.spark)  # labelling below adds only pipeline.* keys
        run.blind_appends = appends_blindly(stored)
    if existed and incremental:
        label_missing_properties(run.spark, run.table, stored, properties)
        advice = upgrade_advice(run.table, stored)
        if advice:
            log.warning(advice)
        run.planned_at = run.table.version(run.spark)
    with warming_workers(run):
        run.plan, planned = make_plan(run, flagged, table_exists=existed and incremental)
    log.info("run %s (%s) planned after %.1fs: %s", run.run_id, mode, run.elapsed,
             json.dumps(asdict(run.plan), sort_keys=True))
    write_rejects(run.spark, run.table, flagged, run.run_id, run.plan.rejected)
    run.writing = True
    if run.plan.duplicated:
        keep_doubled_documents_once(run, planned)
    with released(planned):
        if incremental:
            embed_in_waves(run, planned)
            run.version = run.table.version(run.spark)
        else:
            run.version, totals = write_in_one_commit(
                run, planned.where(F.col("status") == "new"), properties)
            run.written.add(totals)
    return summarize(run)
