"""Checking the inputs, quarantining bad rows and planning a run: which documents are new,
changed, unchanged or deleted, and the waves they are embedded in."""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Literal

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from pipeline.config import InputSettings
from pipeline.run.state import Run, RunPlan
from pipeline.spark.io import InputError, documents
from pipeline.store.delta import (
    check_same_model,
    keep_one_copy,
    with_commit_retries,
)
from pipeline.store.runs import write_rejects

log = logging.getLogger("pipeline.embed")

DUPLICATE_FAILS = "duplicate id (input.duplicates=fail)"
# "duplicated": a document stored twice (a writer killed between its append and its overlap
# check, while another wrote the same document); one copy is kept and it is embedded again.
TO_MERGE = ("changed", "duplicated")
TO_EMBED = ("new", *TO_MERGE)


def check_inputs(run: Run, source: DataFrame, dry_run: bool = False) -> DataFrame:
    """The source's rows flagged with their reject reasons; duplicate ids stop the run here
    (input.duplicates=fail), before any embedding."""
    flagged = flag_rows(source, run.settings.input, run.run_id)
    if run.settings.input.duplicates == "fail":
        try:
            _fail_on_duplicate_ids(run, flagged, quarantine=not dry_run)
        except InputError:
            flagged.unpersist()
            raise
    return flagged


def dry_run_plan(run: Run, flagged: DataFrame) -> RunPlan:
    """The plan, with the same model guard as a real run, and nothing written."""
    exists = run.table.exists(run.spark)
    if exists and run.settings.output.mode != "overwrite":
        check_same_model(run.table, run.table.properties(run.spark), table_properties(run))
    if exists:
        run.planned_at = run.table.version(run.spark)
    plan, planned = make_plan(run, flagged,
                              table_exists=exists and run.settings.output.mode == "incremental")
    planned.unpersist()
    flagged.unpersist()
    return plan


def flag_rows(source: DataFrame, settings: InputSettings, run_id: str) -> DataFrame:
    """Every source row with its document text, hash and reject reason (null when valid);
    duplicate ids fail the run or, with keep_last, reject all but the last row per id.

    The persisted frame carries the run id: Spark shares cached data between equal plans, and
    a Delta scan's plan is equal at every table version, so without it a concurrent or later run
    in the same session could read this run's cached plan of an older table version."""
    docs = documents(source, settings)
    if settings.duplicates == "keep_last":
        valid = F.col("reject_reason").isNull()
        latest = Window.partitionBy("doc_id").orderBy(
            F.when(valid, 0).otherwise(1), F.col("order_key").desc_nulls_last(),
            F.col("content_hash").desc())  # ties on the order column: still one answer
        docs = docs.withColumn("reject_reason", F.when(
            valid & (F.row_number().over(latest) > 1),
            F.lit(f"duplicate id, superseded by a later {settings.order_col}"),
        ).otherwise(F.col("reject_reason")))
    return (docs.drop("order_key").withColumn("run_id", F.lit(run_id))
            .persist(StorageLevel.DISK_ONLY))


def _fail_on_duplicate_ids(run: Run, flagged: DataFrame, quarantine: bool) -> None:
    """With input.duplicates=fail, a duplicated id stops the run before anything is embedded.
    Its rows are quarantined first (not in a dry run), so the rejects table shows them all."""
    valid = flagged.where(F.col("reject_reason").isNull())
    counts = valid.groupBy("doc_id").count().where(F.col("count") > 1)
    duplicates = counts.orderBy(F.col("count").desc(), "doc_id").limit(5).collect()
    if not duplicates:
        return
    if quarantine:
        held = (valid.join(counts.select("doc_id"), "doc_id", "left_semi")
                .withColumn("reject_reason", F.lit(DUPLICATE_FAILS)))
        others = flagged.where(F.col("reject_reason").isNotNull())
        rejects = others.unionByName(held)
        write_rejects(run.spark, run.table, rejects, run.run_id, rejects.count())
    listed = ", ".join(f"{row['doc_id']!r} x{row['count']}" for row in duplicates)
    raise InputError(
        f"duplicate document ids in the source: {listed}; deduplicate the source, or set "
        "input.duplicates=keep_last with input.order_col to keep the latest row per id"
        + (f" (the rows are in {run.table.sibling('_rejects').location})" if quarantine else "")
    )


def make_plan(run: Run, flagged: DataFrame, table_exists: bool) -> tuple[RunPlan, DataFrame]:
    """Classify documents against the table: new, changed, unchanged, deleted. Returns the counts
    and the persisted plan (doc_id, text, content_hash, status); text only where it is needed.
    One pass over the table's key columns (chunk 0 of each document, at the planned version)."""
    source = flagged.where(F.col("reject_reason").isNull()).select("doc_id", "text",
                                                                   "content_hash")
    if table_exists:
        stored = (run.table.read(run.spark, run.planned_at).where(F.col("chunk_index") == 0)
                  .groupBy("doc_id")
                  .agg(F.max("content_hash").alias("stored_hash"),
                       F.count(F.lit(1)).alias("copies")))
        planned = source.join(stored, "doc_id", "full_outer").withColumn("status", _status())
    else:
        planned = source.withColumn("status", F.lit("new")).withColumn("copies", F.lit(0))
    planned = (planned.withColumn("text", F.when(F.col("status").isin(*TO_EMBED), F.col("text")))
               .withColumn("doubled", F.coalesce(F.col("copies") > 1, F.lit(False)))
               .select("doc_id", "text", "content_hash", "status", "doubled")
               .persist(StorageLevel.DISK_ONLY))
    counts: Counter[str] = Counter()
    duplicated = 0
    for row in planned.groupBy("status", "doubled").count().collect():
        counts[row["status"]] += row["count"]
        duplicated += row["count"] if row["doubled"] else 0
    rejected = flagged.where(F.col("reject_reason").isNotNull()).count()
    plan = RunPlan(
        rejected=rejected,
        new=counts.get("new", 0),
        changed=sum(counts.get(status, 0) for status in TO_MERGE),
        unchanged=counts.get("unchanged", 0),
        deleted=counts.get("deleted", 0),
        duplicated=duplicated,
        delete_missing=run.settings.output.deletes_missing(run.settings.input.snapshot),
    )
    plan.documents_read = plan.to_embed + plan.unchanged + rejected
    plan.waves = _wave_count(plan.new, run) + _wave_count(plan.changed, run)
    return plan, planned


def _wave_count(documents: int, run: Run) -> int:
    return math.ceil(documents / run.settings.output.wave_docs)


def _status() -> Column:
    return (F.when(F.col("stored_hash").isNull(), F.lit("new"))
            .when(F.col("content_hash").isNull(), F.lit("deleted"))
            .when(F.col("copies") > 1, F.lit("duplicated"))
            .when(F.col("content_hash") == F.col("stored_hash"), F.lit("unchanged"))
            .otherwise(F.lit("changed")))


def keep_doubled_documents_once(run: Run, planned: DataFrame) -> None:
    """Documents stored twice keep one copy before the waves; those still in the source are
    embedded again, those missing from it are then deleted or kept as the snapshot says."""
    doubled = planned.where(F.col("doubled")).select("doc_id")
    log.warning("run %s: %d documents stored more than once (a writer was killed between its "
                "append and its overlap check); keeping one copy", run.run_id,
                run.plan.duplicated)
    with_commit_retries(
        lambda: keep_one_copy(run.spark, run.table, doubled, run.planned_at,
                              f"{run.run_id}:duplicates"),
        "removing second copies", run.settings.output.commit_retries)


@dataclass
class Wave:
    """One wave's documents and how they are committed."""

    number: int
    of: int
    docs: DataFrame
    kind: Literal["append", "merge"]  # append: documents the plan found absent; merge: changed

    @property
    def tag(self) -> str:
        return f"{self.kind}:{self.number}/{self.of}"


def plan_waves(run: Run, planned: DataFrame) -> list[Wave]:
    """New documents first, in blind-append waves (no join against the table); then changed
    documents in MERGE waves. Waves split documents by a hash of doc_id."""
    plan, waves = run.plan, []
    groups = (("append", ("new",), _wave_count(plan.new, run)),
              ("merge", TO_MERGE, _wave_count(plan.changed, run)))
    for kind, statuses, count in groups:
        for number in range(count):
            in_wave = F.pmod(F.xxhash64("doc_id"), F.lit(count)) == number
            docs = planned.where(F.col("status").isin(*statuses) & in_wave)
            waves.append(Wave(len(waves) + 1, plan.waves, docs, kind))
    return waves


def table_properties(run: Run) -> dict[str, str]:
    """What the table says about its rows: the model's properties, the stored format and the
    chunking (rows chunked another way would not match a clean run)."""
    chunking = run.settings.chunking
    label = "truncate" if chunking.mode == "truncate" else (
        f"window:{chunking.chunk_tokens or 'auto'}:{chunking.chunk_overlap}")
    return {**run.spec.table_properties(),
            "pipeline.vector_format": run.settings.output.vector_format,
            "pipeline.chunking": label}
